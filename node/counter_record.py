"""This machine's record, for the boot it is on, of how far each replica's own counter went.

A data directory put back to an earlier copy without a reboot (a file system snapshot
rolled back, a directory restored from a copy, a copy started beside its original) holds
fewer of its own events than its replica wrote: its next writes would take dots its
peers may hold for other events, and the regions would never converge. A reboot in
between is caught by the boot mark (``log.renew_after_reboot``); this catches the rest.

After every commit that moves its counter, a node writes it (no sync: the record only
has to outlive the process, not the boot) to a file named by its replica id in the
machine's run directory, outside every data directory, and holds a lock on that file
while it runs. A start finds the replica's counter below the record (its commits were
undone), or the record locked by another process (a copy of a running replica): either
way it serves as a new incarnation. An id a directory was renewed from is recorded as
retired: a copy of that directory put back again renews too. A record of another boot
says nothing.

The run directory is the process's own (its owner, no one else may write to it), and
records are opened without following links: another user of the machine cannot plant
a record, nor make a node write through one into a file of its choosing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

_COUNTER_DIGITS = 20  # a counter is below 2**63: 19 digits, and one to spare
KEEP_INTERVAL_S = 1.0  # how often a running node makes its record again if it was removed
# The record of an id a directory was renewed from: above any counter it reached.
RETIRED = (1 << 63) - 1


def run_dirs() -> list[Path]:
    """Where a node keeps its records unless told (``run_dir``), the first it can use
    wins: the system's run directory (emptied at each boot), then the user's own one in
    the temporary directory (records there name their boot). The same for a process
    whatever its environment: a copy started from another shell finds the same record."""
    return [Path("/run/replica-store"), Path("/tmp") / f"replica-store-{os.getuid()}"]


class RunDirUnusable(RuntimeError):
    """The run directory a node was told to use (``run_dir``) cannot hold its records."""


def _not_own(directory: Path) -> str | None:
    """Make ``directory`` if need be; None if it is this user's alone (not a link, owned
    by this user, writable by no one else) and writable, else why not."""
    try:
        if not os.path.lexists(directory):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(directory)
    except OSError as e:
        return f"cannot be made: {e.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory" + (" (a link)" if stat.S_ISLNK(info.st_mode) else "")
    if info.st_uid != os.getuid():
        return f"is owned by another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    if not os.access(directory, os.W_OK):
        return "is not writable"
    return None


def _own_directory(directory: Path) -> bool:
    return _not_own(directory) is None


class CounterRecord:
    """The records of one machine's boot in ``directory``, and the one this process holds."""

    def __init__(self, directory: Path, boot: bytes) -> None:
        self.directory = directory
        self.boot = boot.strip().hex().encode()  # as the record names it: no spaces, one line
        self._held: tuple[str, IO[bytes]] | None = None  # (replica id, its locked file)
        self._written = -1
        self._unkept: str | None = None  # an id whose record could not be opened: said once
        self._unwritten: str | None = None  # likewise, one that could not be written
        # The writer's thread notes; the node's loop keeps (``keep``); a start claims.
        self._lock = threading.RLock()

    @classmethod
    def of_this_machine(
        cls, boot: bytes, dirs: Sequence[Path] | None = None, *, told: Path | None = None
    ) -> CounterRecord | None:
        """Records in the first run directory this process can use; None if none. ``told``:
        the one directory the operator named, which must be usable (else RunDirUnusable)."""
        if told is not None:
            why = _not_own(told)
            if why is not None:
                raise RunDirUnusable(
                    f"the run directory {told} {why}: counter records need a directory of "
                    "this user's alone (mode 700)"
                )
            return cls(told, boot)
        candidates = run_dirs() if dirs is None else list(dirs)
        for directory in candidates:
            if _own_directory(directory):
                return cls(directory, boot)
        logger.warning(
            "no run directory of this user's own to keep counter records in (%s): a data "
            "directory put back to an earlier copy without a reboot is found by its peers "
            "alone",
            ", ".join(str(d) for d in candidates),
        )
        return None

    def _path(self, replica_id: str) -> Path:
        return self.directory / f"{replica_id}.counter"

    def _open(self, replica_id: str) -> IO[bytes] | None:
        """The record's file, locked by this process; None if another process holds it.
        Raises OSError if it cannot be opened."""
        while True:
            path = self._path(replica_id)
            if not _own_directory(self.directory):
                raise OSError(f"{self.directory} is not this user's own directory")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            f = os.fdopen(fd, "r+b")  # not O_APPEND: there, Linux writes a pwrite at the end
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                return None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return f
            f.close()  # unlinked or replaced since it was opened: the file at the path

    def claim(self, replica_id: str) -> int | None:
        """Take ``replica_id``'s record for this process: the counter it reached on this
        boot (0: none), or None if another process holds it (runs as that replica).
        Lets go of the record held before."""
        with self._lock:
            self.release()
            try:
                f = self._open(replica_id)
            except OSError as exc:
                if self._unkept != replica_id:
                    self._unkept = replica_id
                    logger.warning("cannot keep the counter record of %s: %s", replica_id, exc)
                return 0
            if f is None:
                return None
            self._held = (replica_id, f)
            self._written = -1
            return self._read(f)

    def _read(self, f: IO[bytes]) -> int:
        f.seek(0)
        line = f.read(256).partition(b"\n")[0]
        boot, _, digits = line.partition(b" ")
        if boot != self.boot or not digits.isdigit():
            return 0  # another boot's, or none yet
        return int(digits)

    def note(self, replica_id: str, counter: int) -> None:
        """After a commit: ``replica_id``'s counter reached ``counter``. A new id (the
        node renewed its own while running) retires the one held before."""
        with self._lock:
            held = self._held
            if held is not None and held[0] != replica_id:
                self.retire()
                held = None
            if held is None:
                if self._unkept == replica_id or self.claim(replica_id) is None:
                    return
            else:
                self.keep()  # its file removed: a new one
            held = self._held
            if held is not None and counter != self._written:
                self._write(held[1], replica_id, counter)

    def _write(self, f: IO[bytes], replica_id: str, counter: int) -> None:
        line = self.boot + b" " + str(counter).zfill(_COUNTER_DIGITS).encode() + b"\n"
        try:
            os.pwrite(f.fileno(), line, 0)
            if self._written < 0:  # the first write of this holder: no older tail after it
                os.ftruncate(f.fileno(), len(line))
        except OSError as exc:
            if self._unwritten != replica_id:
                self._unwritten = replica_id
                logger.warning("cannot write the counter record of %s: %s", replica_id, exc)
            return
        self._written = counter
        self._unwritten = None

    def keep(self) -> None:
        """Make the held record again if its file was removed (a run directory emptied
        while the node runs): a copy started beside it would find none. Called now and
        then (``KEEP_INTERVAL_S``), and at every commit that moves the counter."""
        with self._lock:
            held = self._held
            if held is None or os.fstat(held[1].fileno()).st_nlink:
                return
            replica_id, written = held[0], self._written
            if self.claim(replica_id) is None:
                self._taken(replica_id)
            elif written >= 0 and self._held is not None:
                self._write(self._held[1], replica_id, written)

    def _taken(self, replica_id: str) -> None:
        """Its record was removed, and another process took the new one before this one
        made it again: that process runs as the same replica (a copy started beside it
        in the gap), and the two may take the same dots."""
        logger.critical(
            "the counter record of %s was removed while this node ran, and another process "
            "on this machine holds it now: it runs as the same replica, and events of the "
            "two may share dots; stop it, and give its directory a new incarnation "
            "(replica new-incarnation) before it starts again",
            replica_id,
        )

    def retire(self) -> None:
        """The id held was renewed away from: record it as retired (a copy of the
        directory that still runs as it, put back later, renews too) and let it go."""
        with self._lock:
            held = self._held
            if held is not None:
                self._write(held[1], held[0], RETIRED)
            self.release()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, None
            if held is not None:
                held[1].close()
