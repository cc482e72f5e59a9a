"""Workloads: the client operations a simulation sends to regions, drawn from a seed.

A mix of profile writes, membership churn on a few hot groups (the same members added
and removed concurrently in many regions), creates and deletes, username/email
collisions across regions, and lives of ids: an id created again after its delete or in
two regions at once, groups deleted and created again, names, emails and usernames
changed, profile keys unset. Operations name entities that may not exist (yet) at the
region they hit; the node then refuses them (404/409), as it would a real client.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from node import commands
from node.writer import Decide

PROFILE_KEYS = ("city", "team", "shift", "title")
KINDS = ("profile", "churn", "create_delete", "collide", "lifecycle")
POOL_IDS = 4  # ids r0..r3, created again and again, in any region: lives and id conflicts


@dataclass(frozen=True, slots=True)
class Mix:
    """Relative weights of the kinds of operation."""

    profile: float = 4.0
    churn: float = 3.0
    create_delete: float = 1.5
    collide: float = 1.0
    lifecycle: float = 1.5

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``profile=4,churn=3,create_delete=1.5,collide=1,lifecycle=1.5``; missing kinds
        weigh 0."""
        weights = dict.fromkeys(KINDS, 0.0)
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, weight = part.partition("=")
            if name not in weights:
                raise ValueError(f"unknown workload kind {name!r}; known: {', '.join(weights)}")
            try:
                weights[name] = float(weight)
            except ValueError:
                raise ValueError(f"the weight of {name} must be a number, got {weight!r}") from None
            if weights[name] < 0:
                raise ValueError(f"the weight of {name} must be 0 or more, got {weight!r}")
        if sum(weights.values()) <= 0:
            raise ValueError("a workload needs at least one kind with a positive weight")
        return cls(**weights)


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation, as a node command (deterministic) or an HTTP request (live)."""

    region: str
    # create_user, create_group, patch_profile, patch_user, add_member, remove_member,
    # delete_user, delete_group
    kind: str
    target: str  # the user or group id
    fields: tuple[tuple[str, str | None], ...] = ()  # None: unset
    member: str = ""

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.fields) or self.member
        return f"{self.kind} {self.target} {extra}".strip()

    @property
    def decide(self) -> Decide:
        fields = dict(self.fields)
        if self.kind == "create_user":
            return commands.create("user", self.target, fields)
        if self.kind == "create_group":
            return commands.create("group", self.target, fields)
        if self.kind in ("patch_profile", "patch_user"):
            return commands.patch("user", self.target, fields, None)
        if self.kind == "add_member":
            return commands.add_member(self.target, self.member)
        if self.kind == "remove_member":
            return commands.remove_member(self.target, self.member)
        if self.kind == "delete_group":
            return commands.delete("group", self.target, None)
        assert self.kind == "delete_user", self.kind
        return commands.delete("user", self.target, None)

    @property
    def request(self) -> tuple[str, str, dict[str, Any] | None]:
        """(method, path, JSON body) of the same operation over the HTTP API."""
        fields = dict(self.fields)
        if self.kind == "create_user":
            return "POST", "/users", {"id": self.target, **fields}
        if self.kind == "create_group":
            return "POST", "/groups", {"id": self.target, **fields}
        if self.kind in ("patch_profile", "patch_user"):
            body: dict[str, Any] = {k: v for k, v in fields.items() if "." not in k}
            profile = {k.removeprefix("profile."): v for k, v in fields.items() if "." in k}
            if profile:
                body["profile"] = profile
            return "PATCH", f"/users/{self.target}", body
        if self.kind == "add_member":
            return "PUT", f"/groups/{self.target}/members/{self.member}", None
        if self.kind == "remove_member":
            return "DELETE", f"/groups/{self.target}/members/{self.member}", None
        if self.kind == "delete_group":
            return "DELETE", f"/groups/{self.target}", None
        return "DELETE", f"/users/{self.target}", None


class Workload:
    def __init__(
        self,
        regions: list[str],
        rng: random.Random,
        mix: Mix = Mix(),
        *,
        users: int = 12,
        hot_groups: int = 2,
        hot_members: int = 4,
    ) -> None:
        self.regions, self.rng, self.mix = regions, rng, mix
        self.users = [f"u{i}" for i in range(users)]
        self.groups = [f"g{i}" for i in range(hot_groups)]
        self.hot_members = self.users[:hot_members]
        self.created = 0
        self.writes = 0

    def setup(self) -> list[Operation]:
        """Create the initial users and groups, each in some region."""
        ops = [self._create_user(self.rng.choice(self.regions), u) for u in self.users]
        ops += [
            Operation(self.rng.choice(self.regions), "create_group", g, (("name", f"Group {g}"),))
            for g in self.groups
        ]
        return ops

    def _create_user(self, region: str, user_id: str, *, email: str | None = None) -> Operation:
        fields = (
            ("name", f"User {user_id}"),
            ("username", user_id),
            ("email", email or f"{user_id}@springfield.example"),
        )
        return Operation(region, "create_user", user_id, fields)

    def next(self) -> Operation:
        rng, region = self.rng, self.rng.choice(self.regions)
        kind = rng.choices(KINDS, weights=[getattr(self.mix, k) for k in KINDS])[0]
        self.writes += 1
        if kind == "profile":
            user, key = rng.choice(self.users), rng.choice(PROFILE_KEYS)
            value = f"{key}-{region}-{self.writes}"
            return Operation(region, "patch_profile", user, ((f"profile.{key}", value),))
        if kind == "churn":
            group, user = rng.choice(self.groups), rng.choice(self.hot_members)
            kind = "add_member" if rng.random() < 0.5 else "remove_member"
            return Operation(region, kind, group, member=user)
        if kind == "lifecycle":
            return self._lifecycle(region)
        if kind == "create_delete":
            if rng.random() < 0.5:
                self.created += 1
                user = f"n{self.created}"
                self.users.append(user)
                return self._create_user(region, user)
            return Operation(region, "delete_user", rng.choice(self.users))
        # A collision: a new user claiming an email another region may be claiming too.
        self.created += 1
        user = f"c{self.created}"
        self.users.append(user)
        email = f"shared{rng.randrange(3)}@springfield.example"
        return self._create_user(region, user, email=email)

    def _lifecycle(self, region: str) -> Operation:
        rng = self.rng
        roll = rng.random()
        if roll < 0.4:  # from a small pool: again after its delete, or in two regions at once
            user = f"r{rng.randrange(POOL_IDS)}"
            if user not in self.users:
                self.users.append(user)
            if roll < 0.15:
                return Operation(region, "delete_user", user)
            return self._create_user(region, user)
        if roll < 0.45:
            return Operation(region, "delete_group", rng.choice(self.groups))
        if roll < 0.5:
            group = rng.choice(self.groups)
            return Operation(region, "create_group", group, (("name", f"Group {group} again"),))
        user = rng.choice(self.users)
        if roll < 0.85:  # a scalar field; an email sometimes one another user may hold
            name = rng.choice(("name", "username", "email"))
            value = {
                "name": f"User {user} {region}-{self.writes}",
                "username": f"{user}-{region}-{self.writes}",
                "email": f"{user}-{self.writes}@springfield.example"
                if rng.random() < 0.7
                else f"shared{rng.randrange(3)}@springfield.example",
            }[name]
            return Operation(region, "patch_user", user, ((name, value),))
        key = rng.choice(PROFILE_KEYS)
        return Operation(region, "patch_user", user, ((f"profile.{key}", None),))
