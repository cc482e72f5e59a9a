"""The storage interface on LMDB: one environment, one named database per table.

Commits are durable when they return (``sync``; ``metasync`` may be turned off as a
named, measured trade: faster commits that may lose the last one on an OS crash).
The map grows on demand: a write that fills it is aborted whole, the map doubled,
and the write run again, so a full map never leaves anything half written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import lmdb

from node import lmdb_pages
from node.kv import DATABASES, ReadTxn, StorageFailed, WriteTxn, key_after

T = TypeVar("T")

# Address space, not disk or memory: the data file grows with what is written. A map
# that fills aborts the write and runs it again in a doubled map, so a bulk ingest or a
# rebuild that starts small pays for each doubling with a whole commit done twice.
MAP_BYTES_INITIAL = 1024 * 1024 * 1024
MAP_GROWTHS_PER_WRITE_MAX = 8
READERS_MAX = 512


class DataDirBusy(RuntimeError):
    """Another process already serves this data directory."""


class DataFileTruncated(RuntimeError):
    """The data file was cut short (a partial copy, a full disk): it is shorter than
    LMDB's two meta pages (LMDB would take an empty one for a new store), or it lacks a
    page its last commit needs (reading it through the map would kill the process with
    SIGBUS). See ``lmdb_pages`` for why its length alone cannot tell."""


class DataFileUnreadable(RuntimeError):
    """The data file is not one LMDB can read (its pages damaged, another format)."""


RESTORE_ADVICE = (
    "Restore the directory from a backup, or move it away and start the node on an empty "
    "one: it comes back as a new incarnation and catches up from its peers"
)


LOCK_FILE = "replica.lock"


def check_size(path: Path) -> None:
    """Before LMDB opens ``path``: raise ``DataFileTruncated`` if its data file exists and
    is shorter than the two meta pages every LMDB file begins with (LMDB would take an
    empty one for a new store, and a node would start as a new, empty replica)."""
    data = path / "data.mdb"
    try:
        size = data.stat().st_size
    except FileNotFoundError:
        return
    if size < 2 * mmap.PAGESIZE:
        raise DataFileTruncated(
            f"{data} is {size:,} bytes, shorter than an LMDB file's first two pages: it was "
            f"cut short (a partial copy, a full disk). {RESTORE_ADVICE}"
        )


def check_pages(path: Path) -> None:
    """Before LMDB opens ``path``, holding its lock (no write may move pages under the
    walk): raise ``DataFileTruncated`` if its data file lacks a page its last commit needs
    (``lmdb_pages``), ``DataFileUnreadable`` if a page of that commit's trees is damaged
    where the file is short."""
    data = path / "data.mdb"
    if not data.exists():
        return
    try:
        lacking = lmdb_pages.first_page_lacking(data)
    except lmdb_pages.Damaged as damaged:
        raise DataFileUnreadable(f"{data} cannot be read as an LMDB file: {damaged}") from None
    if lacking is not None:
        page, page_bytes = lacking
        raise DataFileTruncated(
            f"{data} is {data.stat().st_size:,} bytes, but its last commit needs page "
            f"{page:,} (from byte {page * page_bytes:,} on): it was cut short (a partial "
            f"copy, a full disk). {RESTORE_ADVICE}"
        )


# What an ``LmdbKV`` holding a directory's lock writes in the lock file once it has
# checked the data file's pages (``check_pages``). Every holder that can write empties
# the file when it takes the lock, and an ``LmdbKV`` when it lets it go: a mark is that
# of the holder at hand (but for the instant between its lock and its emptying).
PAGES_CHECKED = b"pages checked\n"
# How long a reader without the lock waits for a holder still checking the pages.
CHECK_WAIT_S = 30.0
CHECK_POLL_S = 0.05


def check_data_file(path: Path) -> None:
    """``check_size``, then ``check_pages`` under the directory's lock, taken for the walk;
    for a reader that opens the directory without holding its lock (the offline tools
    look up its replica id first; a backup copies it while its node runs).

    If another process holds the lock, its writes would move pages under the walk: the
    pages are left to it once it says in the lock file that it checked them (a node that
    serves the directory did when it opened it), after a wait of at most ``CHECK_WAIT_S``
    while it is still checking. A directory without its lock file, and none can be made
    (read-only), has no process writing to it: it is walked as it is."""
    check_size(path)
    lock_path = path / LOCK_FILE
    lock: IO[bytes]
    try:
        lock = lock_path.open("ab")
    except OSError:
        try:
            lock = lock_path.open("rb")  # flock needs no write access
        except FileNotFoundError:
            check_pages(path)
            return
    deadline = time.monotonic() + CHECK_WAIT_S
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if lock_path.read_bytes() == PAGES_CHECKED:
                    return
                if time.monotonic() > deadline:
                    raise DataDirBusy(
                        f"{path} is held by another process that has not checked its data "
                        f"file within {CHECK_WAIT_S:.0f} s"
                    ) from None
                time.sleep(CHECK_POLL_S)
                continue
            if lock.writable():
                os.ftruncate(lock.fileno(), 0)  # a mark left by a holder killed holding it
            check_pages(path)
            return
    finally:
        lock.close()


# The errors of a file that could not grow: no space left, a quota, a file size limit.
# (LMDB reports a write cut short by one of them as an I/O error: see below.)
_FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


# Below this many bytes free for the process, a commit's I/O error is taken for a full
# disk: LMDB reports a write the disk cut short as an I/O error (a fifth of the refusals
# on a filled tmpfs), and one page can be all that was missing.
FULL_DISK_FREE_BYTES_MAX = 1024 * 1024


def _storage_failed(exc: lmdb.Error, path: Path | None = None) -> StorageFailed:
    """What a client and an operator are told of a commit LMDB could not make; ``path``
    (the data directory) tells a full disk behind an I/O error."""
    fatal = isinstance(exc, lmdb.PanicError)
    code = getattr(exc, "code", None)
    full = code in _FULL_ERRNOS
    if code == errno.EIO and path is not None:
        with contextlib.suppress(OSError):
            stats = os.statvfs(path)
            full = stats.f_bavail * stats.f_frsize < FULL_DISK_FREE_BYTES_MAX
    return StorageFailed(str(exc), full=full, fatal=fatal)


def _begin(env: Any, **kwargs: Any) -> Any:
    """``env.begin``; an environment LMDB gave up on (a failed write of its meta page)
    refuses every transaction: ``StorageFailed``, fatal, not an error of the caller's."""
    try:
        return env.begin(**kwargs)
    except lmdb.PanicError as exc:
        raise _storage_failed(exc) from exc


def _mark_checked(lock: IO[bytes]) -> None:
    """Say in the lock file that its holder checked the pages (``PAGES_CHECKED``); on a
    full disk it cannot, and readers without the lock wait for it, then refuse."""
    with contextlib.suppress(OSError):
        os.write(lock.fileno(), PAGES_CHECKED)  # not buffered: a close flushes nothing


# LMDB's lock file for READERS_MAX readers takes some 33 KB, which it writes through a
# map: on a disk too full for them, a new directory's first start died of SIGBUS.
LOCK_FILE_BYTES = 64 * 1024


def _allocate_lock_file(path: Path) -> None:
    """Give a new directory's LMDB lock file its blocks before LMDB maps it; raise
    ``StorageFailed`` if the disk has no room for them."""
    lock_mdb = path / "lock.mdb"
    if lock_mdb.exists():
        return
    fd = os.open(lock_mdb, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    except OSError as exc:
        os.close(fd)
        lock_mdb.unlink(missing_ok=True)
        raise StorageFailed(f"no room for {lock_mdb}: {exc.strerror}", full=True) from None
    os.close(fd)


class _LmdbTxn:
    __slots__ = ("_dbs", "_txn")

    def __init__(self, txn: Any, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    def get(self, db: str, key: bytes) -> bytes | None:
        if not key:  # LMDB refuses an empty key; no table holds one
            return None
        value: bytes | None = self._txn.get(key, db=self._dbs[db])  # bytes: no buffers=True
        return value

    def scan(
        self, db: str, *, prefix: bytes = b"", start: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        with self._txn.cursor(db=self._dbs[db]) as cursor:
            # Position the cursor, then let py-lmdb step it in C, each item as bytes.
            if reverse:
                end = key_after(prefix) if prefix else None
                placed = cursor.set_range(end) if end is not None else False
                placed = cursor.prev() if placed else cursor.last()
                items = cursor.iterprev()
            else:
                placed = cursor.set_range(max(prefix, start or b""))
                items = cursor.iternext()
            if not placed:
                return
            for key, value in items:
                if not key.startswith(prefix):
                    return
                yield key, value

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._dbs[db])

    def put_many(
        self, db: str, items: Iterable[tuple[bytes, bytes]], *, append: bool = False
    ) -> None:
        rows = items if isinstance(items, list) else list(items)
        with self._txn.cursor(db=self._dbs[db]) as cursor:
            _, added = cursor.putmulti(rows, append=append)
        # With ``append``, LMDB skips a key not above the last one: refuse the write.
        if append and added != len(rows):
            raise ValueError(f"{len(rows) - added} of {len(rows)} appended keys out of order")

    def delete(self, db: str, key: bytes) -> None:
        self._txn.delete(key, db=self._dbs[db])

    def clear(self, db: str) -> None:
        self._txn.drop(self._dbs[db], delete=False)


class _Reading(_LmdbTxn):
    """A read transaction, begun as a context manager is entered: a class, not a
    generator, because every GET opens one, and itself the transaction it reads in. It
    holds ``reading`` while open (see ``LmdbKV``)."""

    __slots__ = ("_env", "_reading")

    def __init__(self, env: Any, dbs: dict[str, Any], reading: threading.RLock) -> None:
        self._env, self._dbs, self._reading = env, dbs, reading

    def __enter__(self) -> ReadTxn:
        self._reading.acquire()
        try:
            self._txn = _begin(self._env, buffers=False)
        except BaseException:
            self._reading.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._txn.abort()  # a read-only transaction has nothing to commit
        finally:
            self._reading.release()


def _getter(env: Any, handle: Any, reading: threading.RLock) -> Callable[[bytes], bytes | None]:
    """A read of one key of one table, in a read transaction of its own (holding
    ``reading`` while it is open: see ``LmdbKV``)."""
    begin = env.begin  # its own method: every GET by id makes this read

    def get(key: bytes) -> bytes | None:
        if not key:  # as _LmdbTxn.get
            return None
        with reading:
            try:
                txn = begin(buffers=False)
            except lmdb.PanicError as exc:
                raise _storage_failed(exc) from exc
            try:
                value: bytes | None = txn.get(key, db=handle)
            finally:
                txn.abort()
        return value

    return get


class LmdbKV:
    def __init__(
        self,
        path: Path,
        *,
        map_bytes_initial: int = MAP_BYTES_INITIAL,
        metasync: bool = True,
        durable: bool = True,
    ) -> None:
        """``durable=False`` skips fsync entirely: for simulations, whose crashes are
        simulated in-process and lose no page cache, never for a node that serves."""
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One process per data directory: two writers would each trust their own counters.
        self._lock = (path / LOCK_FILE).open("ab")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataDirBusy(f"{path} is in use by another replica process") from None
        try:
            os.ftruncate(self._lock.fileno(), 0)  # not checked by this holder yet
            check_size(path)
            check_pages(path)
            _mark_checked(self._lock)
            _allocate_lock_file(path)
        except BaseException:
            self._lock.close()
            raise
        self.env = lmdb.open(
            str(path),
            map_size=map_bytes_initial,
            max_dbs=len(DATABASES),
            max_readers=READERS_MAX,
            sync=durable,
            metasync=metasync and durable,
            readahead=False,
        )
        self.env.reader_check()  # free slots of readers that died (kill -9) holding them
        # Growing the map closes every transaction open in this process (LMDB allows it
        # only with none open): each read holds this lock while its transaction is open,
        # and a growth takes it. Reentrant: coroutines of one thread may nest reads.
        self._reading = threading.RLock()
        self._dbs = self._open_dbs()
        self._getters = {
            name: _getter(self.env, handle, self._reading) for name, handle in self._dbs.items()
        }

    def _open_dbs(self) -> dict[str, Any]:
        """Open (and create, in a directory of an older version) every table. Creating one
        writes to a map that may be full: a file as large as the map asked for is opened
        with a map of exactly its size."""
        return self._in_a_write_that_fits(
            lambda txn: {name: self.env.open_db(name.encode(), txn=txn) for name in DATABASES}
        )

    def _in_a_write_that_fits(self, work: Callable[[Any], T]) -> T:
        """Run ``work`` in one py-lmdb write transaction and commit it; on a full map,
        abort, double the map (once no read transaction is open) and run it again."""
        for _ in range(MAP_GROWTHS_PER_WRITE_MAX):
            txn = _begin(self.env, write=True)
            try:
                result = work(txn)
                try:
                    txn.commit()
                except lmdb.MapFullError:
                    raise
                except lmdb.Error as exc:
                    refused = _storage_failed(exc, self.path)
                    refused.fatal = refused.fatal or self._gave_up()
                    raise refused from exc
                return result
            except lmdb.MapFullError:
                txn.abort()
                self._free_dead_readers()
                with self._reading:
                    self.env.set_mapsize(self.map_bytes * 2)
            except BaseException:
                txn.abort()
                self._free_dead_readers()
                raise
        raise lmdb.MapFullError(
            f"write did not fit after {MAP_GROWTHS_PER_WRITE_MAX} map doublings"
        )

    def _gave_up(self) -> bool:
        """Whether LMDB gave up on the environment (a commit whose meta page it could not
        write): every transaction is refused from then on, until it is opened again."""
        try:
            self.env.begin(buffers=False).abort()
        except lmdb.PanicError:
            return True
        except lmdb.Error:
            pass
        return False

    def _free_dead_readers(self) -> None:
        """Free the reader slots of processes gone since (a rebuild's worker killed while
        its write failed): their old snapshots would keep every page freed after them
        from reuse, and the data file would grow with each write until a restart."""
        self.env.reader_check()

    @property
    def map_bytes(self) -> int:
        return int(self.env.info()["map_size"])

    def read(self) -> AbstractContextManager[ReadTxn]:
        return _Reading(self.env, self._dbs, self._reading)

    def get(self, db: str, key: bytes) -> bytes | None:
        return self._getters[db](key)

    def getter(self, db: str) -> Callable[[bytes], bytes | None]:
        return self._getters[db]

    def write(self, work: Callable[[WriteTxn], T]) -> T:
        return self._in_a_write_that_fits(lambda txn: work(_LmdbTxn(txn, self._dbs)))

    def sync(self) -> None:
        """Make every commit durable, the last one's meta page too (without metasync, an
        OS crash may otherwise undo it)."""
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise _storage_failed(exc, self.path) from exc

    def close(self) -> None:
        self.env.close()
        try:
            os.ftruncate(self._lock.fileno(), 0)  # its check says nothing of the next holder's
        except OSError:
            pass
        finally:
            self._lock.close()


@contextmanager
def snapshot(path: Path) -> Iterator[ReadTxn]:
    """A read transaction on the data directory ``path``, in an environment of its own,
    read-only and without the directory's lock: for a worker of the process that holds
    it (a rebuild's). It reads what was committed when it began, not that process's
    write in progress."""
    check_size(path)  # its pages: the process holding the directory checked them
    env = lmdb.open(
        str(path),
        readonly=True,
        max_dbs=len(DATABASES),
        max_readers=READERS_MAX,
        readahead=False,
    )
    try:
        with env.begin(buffers=False) as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn, create=False) for name in DATABASES}
            yield _LmdbTxn(txn, dbs)
    finally:
        env.close()
