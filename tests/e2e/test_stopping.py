"""A node told to stop answers the clients waiting on it at once, rather than holding up
its stop until their waits run out (a supervisor's stop timeout would kill it first)."""

from __future__ import annotations

import threading
import time

from node.tokens import encode_token
from tests.e2e.helpers import Node, Reply

LONG_WAIT_MS = 30_000  # the change feed's longest wait
EXIT_WAIT_S = 10.0  # well inside the waits: they must not be what the stop waits for
IN_FLIGHT_WAIT_S = 1.0  # for the two requests to reach the node before it is stopped


def _in_background(
    node: Node, path: str, headers: dict[str, str] | None = None
) -> tuple[list[Reply], threading.Thread]:
    """A GET sent from a thread of its own; its reply lands in the list."""
    replies: list[Reply] = []
    thread = threading.Thread(
        target=lambda: replies.append(node.call("GET", path, headers=headers)), daemon=True
    )
    thread.start()
    return replies, thread


def test_a_stop_answers_long_polls_and_token_waits_at_once(node: Node) -> None:
    created = node.call(
        "POST",
        "/users",
        {"id": "homer", "name": "Homer", "username": "homer", "email": "homer@springfield.example"},
    )
    assert created.status == 201
    seq = node.call("GET", "/status").json()["seq"]
    unseen = encode_token({"us~0badc0de": 5})  # writes this node will never see
    feed, feeding = _in_background(node, f"/changes?since={seq}&wait={LONG_WAIT_MS}")
    read, reading = _in_background(
        node, "/users/homer", {"X-Consistency-Token": unseen, "X-Wait-Ms": str(LONG_WAIT_MS)}
    )
    time.sleep(IN_FLIGHT_WAIT_S)
    assert not feed, "the long poll ended before the stop"
    assert not read, "the token wait ended before the stop"

    started = time.monotonic()
    assert node.terminate(timeout_s=EXIT_WAIT_S) == 0, node.stderr()
    for thread in (feeding, reading):
        thread.join(EXIT_WAIT_S)
    assert time.monotonic() - started < EXIT_WAIT_S

    assert feed, "the long poll got no answer"
    assert feed[0].status == 200, feed[0].text
    assert feed[0].json() == {"changes": [], "next_cursor": str(seq)}
    assert read, "the token wait got no answer"
    assert read[0].status == 503, read[0].text
    assert read[0].json()["error"] == "stopping"
