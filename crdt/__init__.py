"""Pure conflict-free replicated data types: no I/O, no imports from other packages."""

from crdt.clock import HybridLogicalClock, Observation
from crdt.dot import Dot
from crdt.lww_register import LWWRegister, Write
from crdt.or_set import Add, ORSet, Remove
from crdt.version_vector import OriginSeen, Ranges, VersionVector

__all__ = [
    "Add",
    "Dot",
    "HybridLogicalClock",
    "LWWRegister",
    "ORSet",
    "Observation",
    "OriginSeen",
    "Ranges",
    "Remove",
    "VersionVector",
    "Write",
]
