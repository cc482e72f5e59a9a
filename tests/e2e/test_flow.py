"""A scripted session against a real node: the Simpsons move in."""

from __future__ import annotations

import re
import time
from urllib.parse import quote

from tests.e2e.helpers import Node

SIMPSONS = {
    "homer": ("Homer Simpson", "safety inspector"),
    "marge": ("Marge Simpson", "homemaker"),
    "bart": ("Bart Simpson", "student"),
    "lisa": ("Lisa Simpson", "student"),
    "maggie": ("Maggie Simpson", "baby"),
}


def email(user_id: str) -> str:
    return f"{user_id}@springfield.example"


def test_scripted_flow(node: Node) -> None:
    assert node.call("GET", "/health").json() == {"status": "ok"}
    assert node.ready_line.startswith("replica eu~")

    # Create the family, each with a Location, an ETag and a consistency token.
    for user_id, (name, job) in SIMPSONS.items():
        body = {
            "id": user_id,
            "name": name,
            "username": user_id,
            "email": email(user_id),
            "profile": {"job": job},
        }
        reply = node.call("POST", "/users", body, {"X-Actor": "e2e"})
        assert reply.status == 201, reply.text
        assert reply.headers["location"] == f"/users/{user_id}"
        assert reply.headers["etag"]
        assert reply.headers["x-consistency-token"]
        created = reply.json()
        assert created["name"] == name
        assert created["profile"] == {"job": job}
    before_rename = node.call("GET", "/users/homer")
    token_before_rename = before_rename.headers["x-consistency-token"]
    time_before_rename = before_rename.json()["updated_at"]

    reply = node.call("POST", "/groups", {"id": "simpsons", "name": "The Simpsons"})
    assert reply.status == 201, reply.text
    for user_id in SIMPSONS:
        reply = node.call("PUT", f"/groups/simpsons/members/{user_id}")
        assert reply.status == 200, reply.text
        assert reply.json() == {"group": "simpsons", "user": user_id, "member": True}
    members = node.call("GET", "/groups/simpsons/members").json()
    assert members["members"] == sorted(SIMPSONS)
    assert node.call("GET", "/users/bart/groups").json()["groups"] == ["simpsons"]

    # Rename homer, conditionally; a stale ETag is refused.
    time.sleep(0.01)  # the rename lands in a later millisecond than the creation
    etag = before_rename.headers["etag"]
    reply = node.call("PATCH", "/users/homer", {"name": "Homer J. Simpson"}, {"If-Match": etag})
    assert reply.status == 200, reply.text
    assert reply.json()["name"] == "Homer J. Simpson"
    assert reply.headers["etag"] != etag
    stale = node.call("PATCH", "/users/homer", {"name": "Max Power"}, {"If-Match": etag})
    assert stale.status == 412, stale.text
    assert stale.json()["error"] == "precondition_failed"
    current = node.call("GET", "/users/homer")
    assert current.json()["name"] == "Homer J. Simpson"
    unchanged = node.call("GET", "/users/homer", headers={"If-None-Match": current.headers["etag"]})
    assert unchanged.status == 304

    # The history tells which name won, and why the other did not.
    history = node.call("GET", "/users/homer/history").json()
    names = [e for e in history["events"] if e.get("field") == "name"]
    assert [e["value"] for e in names] == ["Homer Simpson", "Homer J. Simpson"]
    assert names[0]["won"] is False
    assert names[0]["why"] == f"overwritten by {names[1]['dot']}"
    assert names[1]["won"] is True
    assert "why" not in names[1]
    assert history["events"][0]["op"] == "create"
    assert {e["actor"] for e in history["events"][:4]} == {"e2e"}
    assert all(e["origin"].startswith("eu~") for e in history["events"])

    # Time travel: as of before the rename, by time and by token, the old name.
    for at in (time_before_rename, token_before_rename):
        reply = node.call("GET", f"/users/homer?at={quote(at)}")
        assert reply.status == 200, reply.text
        assert reply.json()["name"] == "Homer Simpson"
        assert reply.json()["as_of"] == at
    reply = node.call("GET", f"/users/homer?at={quote('2000-01-01T00:00:00Z')}")
    assert reply.status == 404, reply.text  # homer did not exist yet

    # Lookups (case does not matter) and search.
    found = node.call("GET", f"/users?email={quote('MARGE@Springfield.example')}").json()
    assert [u["id"] for u in found["users"]] == ["marge"]
    found = node.call("GET", "/users?username=lisa").json()
    assert [u["id"] for u in found["users"]] == ["lisa"]
    assert node.call("GET", "/users?email=nobody%40springfield.example").json()["users"] == []
    found = node.call("GET", "/users?q=simpson").json()
    assert sorted(u["id"] for u in found["users"]) == sorted(SIMPSONS)
    found = node.call("GET", "/users?q=lis").json()
    assert [u["id"] for u in found["users"]] == ["lisa"]
    found = node.call("GET", "/users?q=homer+j").json()
    assert [u["id"] for u in found["users"]] == ["homer"]
    page = node.call("GET", "/users?limit=2").json()
    assert [u["id"] for u in page["users"]] == ["bart", "homer"]
    page = node.call("GET", f"/users?limit=2&cursor={page['next_cursor']}").json()
    assert [u["id"] for u in page["users"]] == ["lisa", "maggie"]

    # Removing a member, deleting a user (and with it the membership).
    assert node.call("DELETE", "/groups/simpsons/members/maggie").status == 204
    assert node.call("DELETE", "/users/bart").status == 204
    assert node.call("GET", "/users/bart").status == 404
    members = node.call("GET", "/groups/simpsons/members").json()
    assert members["members"] == ["homer", "lisa", "marge"]
    assert node.call("GET", "/users/maggie/groups").json()["groups"] == []

    # Read-your-writes with the token of the last write; the feed and the status agree.
    reply = node.call("PATCH", "/groups/simpsons", {"name": "Simpson family"})
    assert reply.status == 200, reply.text
    token = reply.headers["x-consistency-token"]
    reply = node.call("GET", "/groups/simpsons", headers={"X-Consistency-Token": token})
    assert reply.json()["name"] == "Simpson family"
    status = node.call("GET", "/status").json()
    feed = node.call("GET", "/changes?since=0&limit=1000").json()
    assert len(feed["changes"]) == status["seq"]
    assert feed["next_cursor"] == str(status["seq"])
    assert node.call("GET", "/conflicts").json() == {"conflicts": [], "next_cursor": None}
    metrics = node.call("GET", "/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    # what the garbage collector has cost the serving process (maybe no collection yet)
    for name in ("replica_gc_pauses_total", "replica_gc_pause_seconds_max"):
        assert re.search(rf"^{name}\{{region=\"eu\"\}} [0-9.e-]+$", metrics.text, re.M), name
    assert node.alive()
