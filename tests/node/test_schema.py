"""Request bodies -> field writes, or the HTTP status and code a bad body deserves."""

from __future__ import annotations

import pytest

from node.schema import FieldError, parse_fields, render

HOMER: dict[str, str | None] = {
    "name": "Homer",
    "username": "homer",
    "email": "homer@springfield.us",
}

# (kind, body, creating, status, code, field)
REFUSED: list[tuple[str, object, bool, int, str, str | None]] = [
    ("user", ["name", "Homer"], True, 400, "bad_body", None),
    ("user", "homer", False, 400, "bad_body", None),
    ("user", None, True, 400, "bad_body", None),
    ("user", {**HOMER, "name": 7}, True, 400, "wrong_type", "name"),
    ("user", {**HOMER, "email": None}, True, 400, "wrong_type", "email"),
    ("user", {**HOMER, "id": 42}, True, 400, "wrong_type", "id"),
    ("user", {**HOMER, "profile": ["city"]}, True, 400, "wrong_type", "profile"),
    ("user", {"profile": {"city": 3}}, False, 400, "wrong_type", "profile.city"),
    ("user", {**HOMER, "age": 39}, True, 400, "unknown_field", "age"),
    ("user", {"members": ["bart"]}, False, 400, "unknown_field", "members"),
    ("user", {"id": "homer"}, False, 400, "unknown_field", "id"),  # ids are chosen on create only
    ("group", {"name": "staff", "profile": {}}, True, 400, "unknown_field", "profile"),
    ("group", {"name": "staff", "email": "a@b.c"}, True, 400, "unknown_field", "email"),
    ("user", {**HOMER, "email": "homer"}, True, 422, "invalid_value", "email"),
    ("user", {**HOMER, "email": "homer@localhost"}, True, 422, "invalid_value", "email"),
    ("user", {**HOMER, "email": "ho mer@x.us"}, True, 422, "invalid_value", "email"),
    ("user", {**HOMER, "username": "h"}, True, 422, "invalid_value", "username"),
    ("user", {**HOMER, "username": "-homer"}, True, 422, "invalid_value", "username"),
    ("user", {**HOMER, "username": "ho mer"}, True, 422, "invalid_value", "username"),
    ("user", {**HOMER, "api_key": "short"}, True, 422, "invalid_value", "api_key"),
    ("user", {**HOMER, "api_key": "has spaces in it"}, True, 422, "invalid_value", "api_key"),
    ("user", {"profile": {"City": "x"}}, False, 422, "invalid_value", "profile"),
    ("user", {"profile": {"1st": "x"}}, False, 422, "invalid_value", "profile"),
    (
        "user",
        {"profile": {f"k{n}": "x" for n in range(65)}},
        False,
        422,
        "invalid_value",
        "profile",
    ),
    ("user", {"profile": {"bio": "x" * 1001}}, False, 422, "invalid_value", "profile.bio"),
    ("user", {**HOMER, "name": "x" * 201}, True, 422, "invalid_value", "name"),
    ("user", {**HOMER, "name": "   "}, True, 422, "invalid_value", "name"),
    ("user", {**HOMER, "id": "a/b"}, True, 422, "invalid_value", "id"),
    ("user", {"name": "Homer", "email": "homer@x.us"}, True, 422, "missing_field", "username"),
    ("user", {}, True, 422, "missing_field", "name"),
    ("group", {}, True, 422, "missing_field", "name"),
    ("user", {}, False, 422, "empty_patch", None),
    ("group", {}, False, 422, "empty_patch", None),
]


@pytest.mark.parametrize(("kind", "body", "creating", "status", "code", "field"), REFUSED)
def test_bad_bodies_are_refused_with_the_right_status(
    kind: str, body: object, creating: bool, status: int, code: str, field: str | None
) -> None:
    with pytest.raises(FieldError) as raised:
        parse_fields(kind, body, creating=creating)
    assert (raised.value.status, raised.value.code, raised.value.field) == (status, code, field)
    assert raised.value.message


ACCEPTED: list[tuple[str, object, bool, str | None, dict[str, str | None]]] = [
    ("user", HOMER, True, None, HOMER),
    (
        "user",
        {**HOMER, "id": "homer-1", "api_key": "k_123456-AB", "profile": {"city": "Springfield"}},
        True,
        "homer-1",
        {**HOMER, "api_key": "k_123456-AB", "profile.city": "Springfield"},
    ),
    (
        "user",
        {"email": "Homer.J+nuclear@plant.springfield.us"},
        False,
        None,
        {"email": "Homer.J+nuclear@plant.springfield.us"},
    ),
    (
        "user",
        {"profile": {"city": None, "bio": "d'oh"}},
        False,
        None,
        {
            "profile.city": None,
            "profile.bio": "d'oh",
        },
    ),
    ("user", {"profile": {}, "name": "H"}, False, None, {"name": "H"}),
    ("group", {"name": "staff", "id": "staff"}, True, "staff", {"name": "staff"}),
    ("group", {"name": "Power plant"}, False, None, {"name": "Power plant"}),
]


@pytest.mark.parametrize(("kind", "body", "creating", "entity_id", "writes"), ACCEPTED)
def test_good_bodies_become_field_writes(
    kind: str, body: object, creating: bool, entity_id: str | None, writes: dict[str, str | None]
) -> None:
    assert parse_fields(kind, body, creating=creating) == (entity_id, writes)


def test_a_null_profile_value_unsets_the_key_in_the_rendered_user() -> None:
    _, writes = parse_fields("user", {"profile": {"city": None}}, creating=False)
    fields = {"name": "Homer", "profile.city": writes["profile.city"], "profile.bio": "d'oh"}
    assert render("user", "homer", fields) == {
        "id": "homer",
        "name": "Homer",
        "profile": {"bio": "d'oh"},
    }
