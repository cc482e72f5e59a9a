"""Entity types, their fields, and every rule a client-supplied value must meet.

``user``: ``name``, ``username``, ``email``, ``api_key`` and free-form ``profile.*``
keys, all last-writer-wins registers. ``group``: ``name`` (LWW) and ``members`` (an
add-wins OR-set of user ids). Parsing a request body yields field writes or a
``FieldError`` carrying the HTTP status to answer with: 400 for a body of the wrong
shape or type, 422 for a well-formed value that breaks a rule.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Value = str | None

ENTITY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{1,63}")
EMAIL_RE = re.compile(r"[^@\s]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
API_KEY_RE = re.compile(r"[A-Za-z0-9_-]{8,128}")
PROFILE_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
NAME_CHARS_MAX = 200
EMAIL_CHARS_MAX = 254
PROFILE_VALUE_CHARS_MAX = 1_000
PROFILE_KEYS_PER_WRITE_MAX = 64
PROFILE_KEYS_MAX = 128  # held by one user at once (commands._check_profile_room)
PROFILE_REGISTERS_MAX = 512  # kept by one user, unset keys included (likewise)

USER_FIELDS = ("name", "username", "email", "api_key")
USER_REQUIRED = ("name", "username", "email")
GROUP_FIELDS = ("name",)
GROUP_REQUIRED = ("name",)
SET_FIELDS = {"group": "members"}
UNIQUE_FIELDS = ("username", "email")  # unique per region on write; conflicts reported after merge


@dataclass
class FieldError(Exception):
    status: int
    code: str
    message: str
    field: str | None = None


def settable(kind: str, field: str) -> bool:
    """Whether ``field`` is one of ``kind``'s registers, which a set event writes."""
    if kind == "user":
        if field.startswith("profile."):
            return PROFILE_KEY_RE.fullmatch(field.removeprefix("profile.")) is not None
        return field in USER_FIELDS
    return kind == "group" and field in GROUP_FIELDS


def check_id(entity_id: object, *, what: str = "id") -> str:
    if not isinstance(entity_id, str):
        raise FieldError(400, "wrong_type", f"{what} must be a string", what)
    if not ENTITY_ID_RE.fullmatch(entity_id):
        raise FieldError(422, "invalid_value", f"{what} must match [A-Za-z0-9_-]{{1,64}}", what)
    return entity_id


def _text(field: str, value: object, *, chars_max: int) -> str:
    if not isinstance(value, str):
        raise FieldError(400, "wrong_type", f"{field} must be a string", field)
    if not value or value.isspace() or len(value) > chars_max:  # blank: as if empty
        raise FieldError(
            422, "invalid_value", f"{field} must be 1 to {chars_max} characters", field
        )
    # Printable ASCII holds no control character: most values pass without the pattern
    # (every event a peer sends is checked too).
    if not (value.isascii() and value.isprintable()) and CONTROL_RE.search(value):
        raise FieldError(
            422, "invalid_value", f"{field} must not contain control characters", field
        )
    return value


def check_value(field: str, value: object) -> Value:
    """The rule of one field, for a value a client sent."""
    if field == "username":
        text = _text(field, value, chars_max=64)
        if not USERNAME_RE.fullmatch(text):
            raise FieldError(
                422, "invalid_value", "username must match [A-Za-z0-9][A-Za-z0-9_.-]{1,63}", field
            )
        return text
    if field == "email":
        text = _text(field, value, chars_max=EMAIL_CHARS_MAX)
        if not EMAIL_RE.fullmatch(text):
            raise FieldError(422, "invalid_value", f"not an email address: {text!r}", field)
        return text
    if field == "api_key":
        text = _text(field, value, chars_max=128)
        if not API_KEY_RE.fullmatch(text):
            raise FieldError(
                422, "invalid_value", "api_key must be 8 to 128 of [A-Za-z0-9_-]", field
            )
        return text
    if field.startswith("profile."):
        if value is None:
            return None  # unsets the key
        return _text(field, value, chars_max=PROFILE_VALUE_CHARS_MAX)
    return _text(field, value, chars_max=NAME_CHARS_MAX)


def parse_fields(kind: str, body: object, *, creating: bool) -> tuple[str | None, dict[str, Value]]:
    """A create or patch body -> (the id asked for, field writes). Raises FieldError."""
    if not isinstance(body, Mapping):
        raise FieldError(400, "bad_body", "the body must be a JSON object")
    allowed = USER_FIELDS if kind == "user" else GROUP_FIELDS
    required = USER_REQUIRED if kind == "user" else GROUP_REQUIRED
    entity_id: str | None = None
    writes: dict[str, Value] = {}
    for key, value in body.items():
        if key == "id" and creating:
            entity_id = check_id(value)
        elif key in allowed:
            writes[key] = check_value(key, value)
        elif key == "profile" and kind == "user":
            writes.update(_profile(value))
        else:
            raise FieldError(400, "unknown_field", f"{kind} has no field {key!r}", key)
    if creating:
        missing = [f for f in required if f not in writes]
        if missing:
            raise FieldError(422, "missing_field", f"{kind} needs {', '.join(missing)}", missing[0])
    elif not writes:
        raise FieldError(422, "empty_patch", "nothing to change")
    return entity_id, writes


def _profile(value: object) -> dict[str, Value]:
    if not isinstance(value, Mapping):
        raise FieldError(400, "wrong_type", "profile must be an object", "profile")
    if len(value) > PROFILE_KEYS_PER_WRITE_MAX:
        raise FieldError(
            422,
            "invalid_value",
            f"at most {PROFILE_KEYS_PER_WRITE_MAX} profile keys per write",
            "profile",
        )
    writes: dict[str, Value] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not PROFILE_KEY_RE.fullmatch(key):
            raise FieldError(422, "invalid_value", f"bad profile key {key!r}", "profile")
        writes[f"profile.{key}"] = check_value(f"profile.{key}", item)
    return writes


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def index_value(field: str, value: str) -> str:
    """The form a unique value is indexed, looked up and claimed under: one spelling in
    Unicode (NFC), ASCII letters in either case. No other character is folded: a full
    case folding made a look-alike (``ſupport@``) the same address as ``support@``, so
    that a lookup of the one found the other's user and its owner was refused it (found
    by a review). Signs Unicode holds for a letter (Kelvin K, Ångström Å: canonically
    equivalent) stay that letter. Usernames are ASCII already."""
    if value.isascii():  # the common case, in one C call: ASCII is in NFC already
        return value.lower()
    return unicodedata.normalize("NFC", value).translate(_ASCII_LOWER)


def search_fold(text: str) -> str:
    """The form searched text and a query's words are compared in: any case, any
    spelling (search finds; it claims nothing)."""
    if text.isascii():  # ASCII is in NFKC already, and casefolds as it lowers
        return text.lower()
    return unicodedata.normalize("NFKC", text).casefold()


def render(kind: str, entity_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON shape of an entity, from its winning field values."""
    out: dict[str, Any] = {"id": entity_id}
    profile = {}
    for field, value in sorted(fields.items()):
        if field.startswith("profile."):
            if value is not None:
                profile[field.removeprefix("profile.")] = value
        else:
            out[field] = value
    if kind == "user":
        out["profile"] = profile
    return out
