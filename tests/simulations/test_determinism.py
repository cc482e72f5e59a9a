"""The same seed replays the same run exactly, event for event."""

from __future__ import annotations

from simulations.deterministic import Faults, Scenario, run_scenario


def test_the_same_seed_gives_the_same_trace() -> None:
    first = run_scenario(Scenario(seed=42, ops=150), keep_trace=True)
    second = run_scenario(Scenario(seed=42, ops=150), keep_trace=True)
    assert first.trace == second.trace
    assert first.trace_digest == second.trace_digest
    assert len(first.trace) > 500  # a real run: messages, writes, faults
    assert [e.dot for e in first.acknowledged] == [e.dot for e in second.acknowledged]


def test_another_seed_gives_another_run() -> None:
    a = run_scenario(Scenario(seed=1, ops=100))
    b = run_scenario(Scenario(seed=2, ops=100))
    assert a.trace_digest != b.trace_digest


def test_a_seed_with_rollbacks_replays_exactly_too() -> None:
    """A rolled-back node comes back as a new incarnation, its id drawn from the seed."""
    scenario = Scenario(seed=7, ops=150, faults=Faults(rollbacks=2))
    first = run_scenario(scenario, keep_trace=True)
    second = run_scenario(scenario, keep_trace=True)
    assert first.trace == second.trace
    assert any(" as " in line for line in first.trace if "restart" in line)  # renewed


def test_sampling_divergence_for_a_plot_leaves_the_run_as_it_was() -> None:
    """``--plot`` gave seed 42 another trace digest than the same seed without it: its
    samples moved when convergence was checked (a review)."""
    plain = run_scenario(Scenario(seed=42, ops=150), keep_trace=True)
    sampled = run_scenario(Scenario(seed=42, ops=150, sample_ms=50), keep_trace=True)
    assert sampled.trace == plain.trace
    assert sampled.trace_digest == plain.trace_digest
    assert len(sampled.divergence) > 100
    assert sampled.divergence[-1][1] == 0  # settled: no key differs
