"""The checker catches every deliberately broken variant, and not the honest system."""

from __future__ import annotations

from typing import Any

import pytest

from simulations.deterministic import Faults, Scenario, run_scenario
from simulations.variants import VARIANTS
from simulations.workload import Mix

# Each variant gets the scenario that exercises what it breaks: ties need a dense
# workload on one clock; a durability lie needs crashes; a renewal skipped, rollbacks.
SCENARIOS: dict[str, dict[str, Any]] = {
    "replication_skips_an_event": {"ops": 120},
    "lww_tie_ignores_origin": {
        "ops": 300,
        "duration_ms": 100,
        "mix": Mix(profile=1, churn=0, create_delete=0, collide=0, lifecycle=0),
        "faults": Faults(skew_ms_max=0, partitions=0, crashes=0),
    },
    "remove_deletes_unobserved_adds": {"ops": 200},
    "ack_before_commit": {"ops": 200, "faults": Faults(crashes=4)},
    # Peers showing the node its own events renew it in most runs all the same, while
    # its writes wait for them: it takes a partition that outlasts the wait.
    # Ids created and deleted again and again, in any region (the workload's lifecycle):
    # created in two regions at once, deleted where one create was seen.
    "a_write_outlives_its_life": {
        "ops": 600,
        "mix": Mix(profile=1, churn=0, create_delete=0, collide=0, lifecycle=3),
    },
    "no_renewal_after_a_reboot": {
        "ops": 200,
        "faults": Faults(rollbacks=6, partitions=6, crashes=0),
    },
}
SEEDS = range(1, 9)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_checker_catches_the_broken_variant(name: str) -> None:
    caught = []
    for seed in SEEDS:
        with VARIANTS[name]():
            result = run_scenario(Scenario(seed=seed, **SCENARIOS[name]))
        if not result.ok:
            caught.append(seed)
            break  # one catch is the proof; the rest would only cost time
    assert caught, f"{name} went unnoticed in seeds {list(SEEDS)}"
    honest = run_scenario(Scenario(seed=caught[0], **SCENARIOS[name]))
    assert honest.ok, f"the honest system fails seed {caught[0]} too: {honest.report}"
