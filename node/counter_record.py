"""This machine's record, for the boot it is on, of how far each replica's own counter went.

A data directory put back to an earlier copy without a reboot (a file system snapshot
rolled back, a directory restored from a copy, a copy started beside its original) holds
fewer of its own events than its replica wrote: its next writes would take dots its
peers may hold for other events, and the regions would never converge. A reboot in
between is caught by the boot mark (``log.renew_after_reboot``); this catches the rest.

After every commit that moves the counter, a node writes it (no sync: the record only
has to outlive the process, not the boot) to a file named by its replica id in the
machine's run directory, outside every data directory, and holds a lock on that file
while it runs. A start finds the replica's counter below the record (its commits were
undone), or the record locked by another process (a copy of a running replica): either
way it serves as a new incarnation. A record of another boot says nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

_COUNTER_DIGITS = 20  # a counter is below 2**63: 19 digits, and one to spare


def run_dirs() -> list[Path]:
    """Where a node keeps its records unless told (``run_dir``), the first it can write to
    wins: the system's run directory (emptied at each boot), the user's (likewise), then
    one in the temporary directory (records there name their boot)."""
    dirs = [Path("/run/replica-store")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "replica-store")
    dirs.append(Path("/tmp") / f"replica-store-{os.getuid()}")
    return dirs


class CounterRecord:
    """The records of one machine's boot in ``directory``, and the one this process holds."""

    def __init__(self, directory: Path, boot: bytes) -> None:
        self.directory = directory
        self.boot = boot.strip().hex().encode()  # as the record names it: no spaces, one line
        self._held: tuple[str, IO[bytes]] | None = None  # (replica id, its locked file)
        self._written = -1

    @classmethod
    def of_this_machine(
        cls, boot: bytes, dirs: Sequence[Path] | None = None
    ) -> CounterRecord | None:
        """Records in the first run directory this process can write to; None if none."""
        for directory in run_dirs() if dirs is None else dirs:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                probe = directory / f".probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError:
                continue
            return cls(directory, boot)
        logger.warning(
            "no run directory this process can write to (%s): a data directory put back "
            "to an earlier copy without a reboot is found by its peers alone",
            ", ".join(str(d) for d in (run_dirs() if dirs is None else dirs)),
        )
        return None

    def _path(self, replica_id: str) -> Path:
        return self.directory / f"{replica_id}.counter"

    def claim(self, replica_id: str) -> int | None:
        """Take ``replica_id``'s record for this process: the counter it reached on this
        boot (0: none), or None if another process holds it (runs as that replica).
        Lets go of the record held before."""
        self.release()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Not in append mode: there, Linux writes a pwrite at the end, not at 0.
            fd = os.open(self._path(replica_id), os.O_RDWR | os.O_CREAT, 0o600)
            f = os.fdopen(fd, "r+b")
        except OSError as exc:
            logger.warning("cannot keep the counter record of %s: %s", replica_id, exc)
            return 0
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        self._held = (replica_id, f)
        self._written = -1
        return self._read(f)

    def _read(self, f: IO[bytes]) -> int:
        f.seek(0)
        boot, _, counter = f.read(256).partition(b" ")
        digits = counter.strip()
        if boot != self.boot or not digits.isdigit():
            return 0  # another boot's, or none yet
        return int(digits)

    def note(self, replica_id: str, counter: int) -> None:
        """After a commit: ``replica_id``'s counter reached ``counter`` (it never goes back
        for one id, so the record's length never shrinks)."""
        held = self._held
        if held is None or held[0] != replica_id:
            if self.claim(replica_id) is None:
                return
            held = self._held
            if held is None:
                return
        if counter == self._written:
            return
        line = self.boot + b" " + str(counter).zfill(_COUNTER_DIGITS).encode() + b"\n"
        try:
            os.pwrite(held[1].fileno(), line, 0)
        except OSError as exc:
            logger.warning("cannot write the counter record of %s: %s", replica_id, exc)
            return
        self._written = counter

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held[1].close()
