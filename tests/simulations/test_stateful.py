"""Hypothesis drives the deterministic simulator: writes at any region, partitions,
one-way cuts, crashes, restarts and the passing of time, in any order. After every
heal, all regions must have converged to exactly what the oracle computes, with no
acknowledged write missing anywhere."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from simulations.deterministic import Faults, Scenario, Simulation
from simulations.workload import Operation

REGIONS = ("eu", "us", "ap")
USERS = ("homer", "marge", "bart")
region = st.sampled_from(REGIONS)
user = st.sampled_from(USERS)

operations = st.one_of(
    st.builds(
        lambda r, u: Operation(
            r,
            "create_user",
            u,
            (("name", u.title()), ("username", u), ("email", f"{u}@springfield.example")),
        ),
        region,
        user,
    ),
    st.builds(
        lambda r, u, v: Operation(r, "patch_profile", u, (("profile.city", v),)),
        region,
        user,
        st.sampled_from(["Springfield", "Shelbyville", "Capital City"]),
    ),
    st.builds(lambda r: Operation(r, "create_group", "simpsons", (("name", "Simpsons"),)), region),
    st.builds(lambda r, u: Operation(r, "add_member", "simpsons", member=u), region, user),
    st.builds(lambda r, u: Operation(r, "remove_member", "simpsons", member=u), region, user),
    st.builds(lambda r, u: Operation(r, "delete_user", u), region, user),
)


class Cluster(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="sim-stateful-"))
        faults = Faults(loss=0.05, duplicate=0.05, partitions=0, crashes=0, skew_ms_max=100)
        scenario = Scenario(seed=0, regions=REGIONS, faults=faults, heal_wait_ms_max=30_000)
        self.sim = Simulation(scenario, self.root)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.sim.start())
        self.down: set[str] = set()

    def run(self, step: object) -> object:
        return self.loop.run_until_complete(step)  # type: ignore[arg-type]

    @rule(op=operations)
    def write(self, op: Operation) -> None:
        self.run(self.sim.client(op.region, op.decide, op.label))

    @rule(alone=region)
    def partition(self, alone: str) -> None:
        self.sim.partition({alone}, set(REGIONS) - {alone})

    @rule(source=region, to=region)
    def one_way_cut(self, source: str, to: str) -> None:
        if source != to:
            self.sim.cut(source, to)

    @rule(ms=st.integers(1, 3_000))
    def advance_time(self, ms: int) -> None:
        self.run(self.sim.advance(ms))

    @precondition(lambda self: len(self.down) < len(REGIONS) - 1)
    @rule(name=region)
    def crash(self, name: str) -> None:
        self.run(self.sim.crash(name))
        self.down.add(name)

    @rule(name=region)
    def restart(self, name: str) -> None:
        self.run(self.sim.restart(name))
        self.down.discard(name)

    @rule()
    def heal(self) -> None:
        assert self.run(self.sim.settle()), "did not converge after the heal"
        self.down.clear()
        report = self.sim.finish().report
        assert report is not None
        assert report.ok, report.violations

    def teardown(self) -> None:
        try:
            self.heal()
        finally:
            for node in self.sim.nodes.values():
                if node.replica is not None:
                    node.replica.close()
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)


Cluster.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestCluster = Cluster.TestCase
