"""The history's verdicts: the same on every replica that holds the same events."""

from __future__ import annotations

from crdt import Dot
from node.audit import verdicts
from node.events import Event, Op

EU, US = "eu~aaaa", "us~bbbb"
STAMP = 1_700_000_000_000 << 16


def test_a_write_cleared_by_two_deletes_names_the_same_one_in_any_log_order() -> None:
    """Both regions deleted the create a write was made under: each replica's log holds
    its own delete first, and the history named the first in its log, so two replicas
    told two stories (found by a review). The first by the order of writes is named."""
    create = Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE)
    write = Event(
        Dot(EU, 2), STAMP + 1, "user/homer", Op.SET, "name", "Homer", lives=frozenset({create.dot})
    )
    eu_delete = Event(
        Dot(EU, 3), STAMP + 5, "user/homer", Op.DELETE, observed=frozenset({create.dot})
    )
    us_delete = Event(
        Dot(US, 1), STAMP + 3, "user/homer", Op.DELETE, observed=frozenset({create.dot})
    )
    on_eu = verdicts([create, write, eu_delete, us_delete])
    on_us = verdicts([create, write, us_delete, eu_delete])
    assert on_eu == on_us
    assert on_eu[1] == (
        False,
        f"cleared by the delete {us_delete.dot} of the create {create.dot} it was written under",
    )
