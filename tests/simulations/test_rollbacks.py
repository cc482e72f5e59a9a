"""Rollbacks: a node's disk put back to a snapshot taken while it ran (a virtual machine's
snapshot restored, the machine booted again), its last commits undone after peers got
some of them. The regions must converge, every acknowledged write but the rolled-back
node's own since the snapshot that no other node held must survive, and no summary may
grow with later writes."""

from __future__ import annotations

from simulations.deterministic import Faults, Scenario, run_scenario

SEEDS = range(1, 13)


def sweep(faults: Faults) -> tuple[int, int, int]:
    """Run every seed of ``SEEDS`` with ``faults``; each must pass, refuse no message, and
    keep its summaries bounded by what the rollbacks undid, not by the writes after them.
    Returns the writes undone, the renewals at a restart and those while running."""
    undone = at_start = running = 0
    for seed in SEEDS:
        result = run_scenario(Scenario(seed=seed, ops=200, faults=faults), keep_trace=True)
        assert result.ok, f"seed {seed}: {result.report}\nreplay: {result.scenario.command()}"
        assert result.refused == 0, f"seed {seed}"
        assert result.cloud_max <= len(result.undone), f"seed {seed}"
        undone += len(result.undone)
        at_start += sum(" as " in line for line in result.trace if "restart" in line)
        running += sum(line.split()[1] == "renewed" for line in result.trace)
    return undone, at_start, running


def test_regions_converge_and_keep_every_write_through_rollbacks() -> None:
    undone, at_start, _ = sweep(Faults(rollbacks=2))
    # The faults took place: writes were undone (lost with no peer holding them), and
    # nodes came back renewed.
    assert undone > 0
    assert at_start >= len(SEEDS)


def test_a_copy_restored_on_the_same_boot_renews_at_start_by_the_machine_s_record() -> None:
    """Restored on the same machine, the node finds its counter below the machine's
    record of it (``node.counter_record``) and serves as a new incarnation at once: no
    write is lost even where a peer that holds its undone events is cut off for longer
    than the start's wait (with the peers alone to tell, 15 of 100 seeds failed so)."""
    undone, at_start, _ = sweep(Faults(rollbacks=3, same_boot=1.0, partitions=6))
    assert undone > 0
    assert at_start >= len(SEEDS)


def test_a_copy_restored_on_the_same_boot_without_the_record_is_found_out_by_its_peers() -> None:
    """Restored on the same machine, its counter record lost too (a run directory
    emptied), the node cannot tell: it renews its id while it runs, when a peer shows it
    its own events beyond its log, and its client writes wait for every peer's first word
    after the start (at most 3 s: no partition here outlasts it). No write is lost, no
    honest message is refused."""
    faults = Faults(rollbacks=3, same_boot=1.0, record_lost=1.0, partitions=0)
    undone, at_start, running = sweep(faults)
    assert at_start == 0
    assert undone > 0
    assert running >= len(SEEDS)
