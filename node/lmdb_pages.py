"""The pages an LMDB file's last commit reaches, read from the file with ``pread``.

A data file cut short past LMDB's two meta pages (a partial copy, a full disk) cannot
be found from its length alone: LMDB's record of its last page counts pages a write took
and gave back in the same transaction, which are never written, so a healthy file may
end before that page. Reading a missing page through LMDB's map kills the process
(SIGBUS). So where the file ends before that record, this walks every tree the newest
meta page roots (the free-page list, the main table and each named table in it),
through the file, and finds a page one of them needs that the file lacks.

The layout read is LMDB 0.9's on a little-endian 64-bit machine (what py-lmdb builds
here): a page begins with its number, two pad bytes, its flags, then the bounds of its
node pointers (or an overflow run's page count); a node begins with two halves of its
data size (a branch node: of its child's page number, the flags holding the top bits),
its flags and its key size. A file laid out otherwise (another byte order, another
version) is not walked: LMDB itself says what it makes of it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
PAGE_HEADER_BYTES = 16
NODE_HEADER_BYTES = 8
NO_PAGE = (1 << 64) - 1  # an empty tree's root (P_INVALID)
# Page flags
P_BRANCH, P_LEAF, P_OVERFLOW, P_LEAF2 = 0x01, 0x02, 0x04, 0x20
# Leaf node flags: data on overflow pages; data is a table's record; sorted duplicates
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04

# A table's record (MDB_db): pad (the page size, in the free list's), flags, depth,
# branch, leaf and overflow pages, entries, root.
_TABLE = struct.Struct("<IHHQQQQQ")
# A meta page after its header: magic, version, map address, map size, the free list's
# and the main table's records, the last page, the transaction id.
_META = struct.Struct(f"<IIQQ{_TABLE.size}s{_TABLE.size}sQQ")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Damaged(ValueError):
    """A page of the last commit's trees is not what LMDB writes (damaged, or garbage)."""


@dataclass(frozen=True, slots=True)
class Meta:
    page_bytes: int
    last_page: int
    txnid: int
    free_root: int
    main_root: int


@dataclass
class Census:
    """What a walk found in one table: LMDB's own counts of it (``Transaction.stat``), for
    a table without sorted duplicates (the store has none; of one with them, the walk
    counts keys, and only finds the pages of their trees)."""

    root: int = NO_PAGE
    branch_pages: int = 0
    leaf_pages: int = 0
    overflow_pages: int = 0
    entries: int = 0


@dataclass
class Walk:
    """A walk of the last commit's trees: the first page found that they need beyond the file's end
    (None: the file holds them all), the highest page they need (of a walk that found
    none missing), and the census of each named table."""

    missing: int | None = None
    highest: int = 1
    reached: set[int] = field(default_factory=set)  # every tree page visited
    tables: dict[bytes, Census] = field(default_factory=dict)


def read_meta(fd: int) -> Meta | None:
    """The newest of the two meta pages (as LMDB picks: the greater transaction id), or
    None if they are not this layout's."""
    metas = []
    page_bytes = 0
    for number in (0, 1):
        raw = os.pread(fd, PAGE_HEADER_BYTES + _META.size, number * page_bytes)
        if len(raw) < PAGE_HEADER_BYTES + _META.size:
            return None
        magic, version, _, _, free, main, last_page, txnid = _META.unpack_from(
            raw, PAGE_HEADER_BYTES
        )
        if magic != MAGIC or version != DATA_VERSION:
            return None
        page_bytes = _TABLE.unpack(free)[0]  # the free list's pad holds the page size
        if page_bytes < 512 or page_bytes & (page_bytes - 1):
            return None
        metas.append(
            Meta(page_bytes, last_page, txnid, _TABLE.unpack(free)[7], _TABLE.unpack(main)[7])
        )
    return max(metas, key=lambda meta: meta.txnid)


def first_page_lacking(path: Path) -> tuple[int, int] | None:
    """For the data file ``path``: None if it holds every page its last commit needs (or
    is not of the layout this reads); else (a page it lacks, the first the walk met, and
    its page size)."""
    with path.open("rb") as f:
        fd = f.fileno()
        meta = read_meta(fd)
        if meta is None:
            return None
        pages_in_file = os.fstat(fd).st_size // meta.page_bytes
        if pages_in_file > meta.last_page:
            return None  # every page there is lies in the file: no walk needed
        missing = walk(fd, meta, pages_in_file).missing
    return None if missing is None else (missing, meta.page_bytes)


def walk(fd: int, meta: Meta, pages_in_file: int) -> Walk:
    """Visit every page the trees of ``meta`` reach, stopping at the first one found past
    ``pages_in_file``. Raises ``Damaged`` on a page that is not a tree's."""
    try:
        return _walk(fd, meta, pages_in_file)
    except struct.error as exc:  # a size or an offset that runs off its page
        raise Damaged(f"a page of this file's trees runs off its end ({exc})") from None


def _walk(fd: int, meta: Meta, pages_in_file: int) -> Walk:
    found = Walk()
    size = meta.page_bytes
    seen = found.reached
    # (page, its table's census, is it the main table's): the free list's, the main's
    stack: list[tuple[int, Census, bool]] = [
        (root, Census(), main)
        for root, main in ((meta.free_root, False), (meta.main_root, True))
        if root != NO_PAGE
    ]
    while stack:
        number, census, main = stack.pop()
        if number >= pages_in_file:
            found.missing = number
            return found
        if number in seen or number < 2:
            raise Damaged(f"page {number} is reached twice, or is a meta page")
        seen.add(number)
        found.highest = max(found.highest, number)
        page = os.pread(fd, size, number * size)
        if len(page) < size:
            found.missing = number
            return found
        flags = _U16.unpack_from(page, 10)[0]
        lower, upper = _U16.unpack_from(page, 12)[0], _U16.unpack_from(page, 14)[0]
        if _U64.unpack_from(page, 0)[0] != number or not (
            PAGE_HEADER_BYTES <= lower <= upper <= size
        ):
            raise Damaged(f"page {number} is not a page of this file's trees")
        pointers = struct.unpack_from(
            f"<{(lower - PAGE_HEADER_BYTES) // 2}H", page, PAGE_HEADER_BYTES
        )
        if flags & P_BRANCH:
            census.branch_pages += 1
            for at in pointers:
                if at < upper or at + NODE_HEADER_BYTES > size:
                    raise Damaged(f"page {number} points outside its nodes")
                low, high, top = struct.unpack_from("<HHH", page, at)
                stack.append((low | high << 16 | top << 32, census, main))
        elif flags & P_LEAF2:  # fixed-size duplicates: keys only, nothing further
            census.leaf_pages += 1
        elif flags & P_LEAF:
            census.leaf_pages += 1
            for at in pointers:
                if at < upper or at + NODE_HEADER_BYTES > size:
                    raise Damaged(f"page {number} points outside its nodes")
                node_flags, key_bytes = struct.unpack_from("<HH", page, at + 4)
                if not main:
                    census.entries += 1
                data = at + NODE_HEADER_BYTES + key_bytes
                # A page number, or a table's record, must lie within the page.
                held = 8 if node_flags & F_BIGDATA else _TABLE.size if node_flags & F_SUBDATA else 0
                if data + held > size:
                    raise Damaged(f"page {number} holds a node that runs off its end")
                if node_flags & F_BIGDATA:
                    first = _U64.unpack_from(page, data)[0]
                    runs = _overflow_pages(fd, size, first, pages_in_file)
                    if runs is None:
                        found.missing = first
                        return found
                    census.overflow_pages += runs
                    found.highest = max(found.highest, first + runs - 1)
                    if first + runs > pages_in_file:
                        found.missing = pages_in_file
                        return found
                elif node_flags & F_SUBDATA:
                    root = _TABLE.unpack_from(page, data)[7]
                    if main:  # a named table: a census of its own
                        key = page[at + NODE_HEADER_BYTES : data]
                        table = found.tables[key] = Census(root)
                        if root != NO_PAGE:
                            stack.append((root, table, False))
                    elif root != NO_PAGE:  # a key's sorted duplicates, as a tree
                        stack.append((root, Census(), False))
        else:
            raise Damaged(f"page {number} is neither a branch nor a leaf (flags {flags:#x})")
    return found


def _overflow_pages(fd: int, size: int, first: int, pages_in_file: int) -> int | None:
    """How many pages the overflow run at ``first`` takes, or None if it is missing."""
    if first >= pages_in_file:
        return None
    head = os.pread(fd, PAGE_HEADER_BYTES, first * size)
    if len(head) < PAGE_HEADER_BYTES:
        return None
    if _U64.unpack_from(head, 0)[0] != first or not _U16.unpack_from(head, 10)[0] & P_OVERFLOW:
        raise Damaged(f"page {first} is not an overflow page")
    return int(_U32.unpack_from(head, 12)[0])
