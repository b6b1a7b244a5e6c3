"""Partitioners: which downstream instance gets each row of a batch.

* :class:`HashPartitioner` (the default for ``key_by``): by a stable, seedless 64-bit hash of
  the key (int or str column), through its key group (one of ``KEY_GROUPS``; instance i of n
  owns a contiguous range of groups), so a key always lands on the same instance, in every
  process and run, and its rows keep their order. With ``salt=s`` the i-th row of the stream goes to
  ``(partition(key) + i mod s) mod n``: one key spreads evenly over min(s, n) partitions
  (hot keys; see ``aggregate(salt=...)``), at the price of its order.
* :class:`RoundRobinPartitioner`: whole batches in turn, for load balance without keys.
* :class:`RangePartitioner`: sorted ``bounds`` split the key space into contiguous ranges.
* :class:`CustomPartitioner`: ``fn(batch, n)`` returns a partition id per row.

>>> import numpy as np
>>> from mpstream.batch import Batch
>>> b = Batch({"k": np.array([5, 1, 5, 9])})
>>> [None if part is None else part["k"].tolist() for part in split(b, RangePartitioner("k", [4]).assign(b, 2), 2)]
[[1], [5, 5, 9]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ._mps import lib
from .batch import Batch, Column, StringColumn, _ptr, values_of
from .errors import PartitionError

__all__ = ["Partitioner", "HashPartitioner", "RoundRobinPartitioner", "RangePartitioner",
           "CustomPartitioner", "PartitionError", "hash_column", "split", "KEY_GROUPS", "key_groups",
           "instance_of", "groups_of_instance"]


def hash_column(col: Column) -> np.ndarray:
    """Stable 64-bit hashes (uint64) of an int, bool or str column."""
    out = np.empty(len(col), np.uint64)
    if isinstance(col, StringColumn):
        lib.mps_hash_utf8(_ptr("int64_t[]", col.offsets), _ptr("uint8_t[]", col.data), len(col), _ptr("uint64_t[]", out))
    elif col.dtype.kind in "biu":
        keys = np.ascontiguousarray(col, np.int64) if col.dtype != np.int64 else col
        lib.mps_hash_int64(_ptr("int64_t[]", keys), len(col), _ptr("uint64_t[]", out))
    else:
        raise PartitionError(f"cannot hash a {col.dtype} column: key columns must be int, bool or str")
    return out


#: Keyed state is kept per key group; a key's group never changes, an instance owns a range of
#: groups, so state can move to another parallelism by whole groups (Flink's max parallelism).
KEY_GROUPS = 128
assert KEY_GROUPS <= lib.MPS_MAX_KEY_GROUPS


def _owners(col: Column, n: int, salt: int = 0, row: int = 0) -> np.ndarray:
    """The instance (of n, up to KEY_GROUPS) that owns each key's group, as instance_of; with
    a salt, row i of the column (row + i of the stream) goes (row + i) mod salt instances on
    (mod n). One C pass, in place over the keys' hashes."""
    hashes = hash_column(col)
    owners = hashes.view(np.int64)
    if lib.mps_hashes_to_instances(_ptr("uint64_t[]", hashes), len(hashes), KEY_GROUPS, n, max(salt, 1), row,
                                   _ptr("int64_t[]", owners)) != 0:
        raise PartitionError(f"a keyed operator has 1 to {KEY_GROUPS} instances (key groups), got {n}")
    return owners


def key_groups(col: Column) -> np.ndarray:
    """The key group (int64, 0..KEY_GROUPS-1) of every key of a column: each group is its
    own owner when there are as many instances as groups."""
    return _owners(col, KEY_GROUPS)


def instance_of(groups: np.ndarray | int, n: int) -> np.ndarray | int:
    """The instance, out of n, that owns each key group: contiguous ranges of groups."""
    return groups * n // KEY_GROUPS


def groups_of_instance(instance: int, n: int) -> range:
    """The key groups instance owns out of n (the inverse of instance_of)."""
    return range(-(-instance * KEY_GROUPS // n), -(-(instance + 1) * KEY_GROUPS // n))


class Partitioner:
    """Assigns rows to n partitions: ``assign`` returns an int64 id per row, or one int for the
    whole batch (cheaper: no split)."""

    key: str | None = None

    def assign(self, batch: Batch, n: int) -> np.ndarray | int:
        raise NotImplementedError


class HashPartitioner(Partitioner):
    def __init__(self, key: str, salt: int = 0) -> None:
        self.key = key
        self.salt = salt
        self._row = 0  # salts rows in turn, so a hot key spreads evenly

    def assign(self, batch: Batch, n: int) -> np.ndarray | int:
        if n == 1:
            return 0
        # with a salt row i of a key goes (i mod salt) instances on: evenly spread
        ids = _owners(_key_column(batch, self.key), n, self.salt, self._row)
        if self.salt > 1:
            self._row += batch.num_rows
        return ids


class RoundRobinPartitioner(Partitioner):
    def __init__(self) -> None:
        self._next = 0

    def assign(self, batch: Batch, n: int) -> int:
        self._next = (self._next + 1) % n
        return self._next


class RangePartitioner(Partitioner):
    """bounds (sorted, n - 1 values): partition i holds keys in [bounds[i-1], bounds[i])."""

    def __init__(self, key: str, bounds: Sequence[float] | np.ndarray) -> None:
        self.key = key
        self.bounds = np.asarray(bounds)
        if np.any(np.diff(self.bounds) < 0):
            raise PartitionError(f"range bounds for key {key!r} must be sorted, got {self.bounds}")

    def assign(self, batch: Batch, n: int) -> np.ndarray:
        if len(self.bounds) != n - 1:
            raise PartitionError(f"a range partitioner over {n} partitions needs {n - 1} bounds, got {len(self.bounds)}")
        col = _key_column(batch, self.key)
        if isinstance(col, StringColumn):
            col = col.to_numpy()
        return np.searchsorted(self.bounds, col, side="right").astype(np.int64)


class CustomPartitioner(Partitioner):
    def __init__(self, fn: Callable[[Batch, int], np.ndarray]) -> None:
        self.fn = fn

    def assign(self, batch: Batch, n: int) -> np.ndarray:
        return np.asarray(self.fn(batch, n), np.int64)


def _key_column(batch: Batch, key: str) -> Column:
    """A key column's values: a null key reads as 0 (or ""), so every null goes to one place."""
    try:
        return values_of(batch[key])
    except KeyError:
        raise PartitionError(f"key column {key!r} is not in the batch (columns: {list(batch)})") from None


#: partition_rows' mark of a partition that gets every row of the batch, in order (no gather)
ALL = slice(None)


def partition_rows(batch: Batch, ids: np.ndarray | int, n: int) -> list[np.ndarray | slice | None]:
    """Each of n partitions' rows of batch by partition id (one stable counting sort): int64
    indices, rows in their order; :data:`ALL` where every row goes; None where none does."""
    rows: list[np.ndarray | slice | None] = [None] * n
    if isinstance(ids, (int, np.integer)):
        if not 0 <= ids < n:
            raise PartitionError(f"partition {ids} is outside 0..{n - 1}")
        rows[int(ids)] = ALL
        return rows
    ids = np.ascontiguousarray(ids, np.int64)
    if ids.shape != (batch.num_rows,):
        raise PartitionError(f"a partitioner returned {ids.shape} ids for {batch.num_rows} rows")
    order = np.empty(len(ids), np.int64)
    counts = np.empty(n, np.int64)
    if lib.mps_partition_order(_ptr("int64_t[]", ids), len(ids), n, _ptr("int64_t[]", order), _ptr("int64_t[]", counts)):
        bad = ids[(ids < 0) | (ids >= n)][:5]
        raise PartitionError(f"partition ids must be in 0..{n - 1}, got e.g. {bad.tolist()}")
    nonempty = np.flatnonzero(counts)
    if len(nonempty) == 1:
        rows[int(nonempty[0])] = ALL
        return rows
    start = 0
    for p, count in enumerate(counts.tolist()):
        if count:
            rows[p] = order[start : start + count]
        start += count
    return rows


def split(batch: Batch, ids: np.ndarray | int, n: int) -> list[Batch | None]:
    """The batch cut into n parts by partition id (None where a part is empty); rows keep
    their order within a part."""
    return [None if rows is None else batch if rows is ALL else batch.take(rows)
            for rows in partition_rows(batch, ids, n)]
