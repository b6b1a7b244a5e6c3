"""Keyed aggregation state: sum, count, min, max and mean per key, mergeable.

A :class:`KeyedAggregate` maps each key (an int or str column) to a dense slot through a C hash
map and updates one accumulator array per partial in place with C scatter kernels: ``count`` per key, and per value column its
``sum``, ``min`` and ``max`` as the requested functions need. It takes raw rows (``update``)
or the partials of another instance (``merge``): that is what makes two-stage (salted)
aggregation exact: sums, counts, mins and maxs of partials combine into those of the whole,
and the mean is computed once, at the end, from the total sum and count.

Str keys are identified by a 64-bit hash of their UTF-8 bytes (two distinct strings sharing a
hash would be merged; with n keys the chance is about n^2 / 2^65, 3e-8 for a million keys).
That figure holds for keys nobody chose to collide: the hash has a fixed, public seed (it must
place keys in the same key groups in every process and run), so keys crafted against it can
be made to collide. Aggregate keys an adversary controls (raw URLs, user-supplied ids) by an
id of your own, or hash them with a keyed hash first.

>>> import numpy as np
>>> from mpstream.batch import Batch
>>> agg = KeyedAggregate("k", {"v": ["sum", "mean"], "*": "count"})
>>> agg.update(Batch({"k": np.array([1, 2, 1]), "v": np.array([1.0, 5.0, 3.0])}))
>>> r = agg.result()
>>> r["k"].tolist(), r["v_sum"].tolist(), r["v_mean"].tolist(), r["count"].tolist()
([1, 2], [4.0, 5.0], [2.0, 5.0], [2, 1])
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from ._mps import ffi, lib
from .batch import Batch, Column, StringColumn, _ptr, null_mask, values_of
from .errors import AggregateError
from .partition import hash_column

__all__ = ["KeyIndex", "Accumulators", "KeyedAggregate", "Combiner", "AggregateError", "FUNCTIONS", "parse_spec",
           "DIRECT_KEYS"]

FUNCTIONS = ("sum", "count", "min", "max", "mean")
_NEEDS = {"sum": ("sum",), "mean": ("sum",), "min": ("min",), "max": ("max",), "count": ()}
_COUNT = "count"
_NULLS = "nulls"  # a value column's partial: its null values per key
_UFUNCS = {"sum": np.add, "min": np.minimum, "max": np.maximum, _COUNT: np.add, _NULLS: np.add}  # how a part combines


def parse_spec(spec: Mapping[str, str | Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """{"column": "sum" | ["sum", "max"], "*": "count"} -> (("column", "sum"), ...)."""
    items = []
    for column, funcs in spec.items():
        for func in [funcs] if isinstance(funcs, str) else funcs:
            if func not in FUNCTIONS:
                raise AggregateError(f"unknown aggregate {func!r} for column {column!r}; use one of {FUNCTIONS}")
            if column == "*" and func != "count":
                raise AggregateError(f"'*' takes only count, not {func!r}")
            items.append((column, func))
    if not items:
        raise AggregateError("an aggregation needs at least one function")
    return tuple(items)


class KeyIndex:
    """Keys of one column (int, bool or str) to dense slots 0, 1, 2, ... in order of first
    appearance, through the C key map; remembers each slot's key. A column's type is fixed by
    the first batch. Str keys are identified by their 64-bit hash (see the module doc). The null
    key (a nullable key column's nulls) is one key, with a slot of its own, as SQL's GROUP BY
    groups nulls together."""

    def __init__(self, key: str, expected_keys: int = 1024) -> None:
        self.key = key
        self._map = ffi.gc(lib.mps_keymap_new(expected_keys), lib.mps_keymap_free)
        self._size = 0
        self.kind: str | None = None  # "str" or an int dtype.str, fixed by the first batch
        self._names: list[StringColumn] = []  # str keys: the string of each slot, in slot order
        self._keys: Column | None = None  # the last keys() of every slot
        self._ids: tuple[int, np.ndarray] | None = None  # int keys: (slots fetched, their buffer)
        self._null: int | None = None  # the null key's slot

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        """Forgets every key (the next one gets slot 0), keeping the map's memory."""
        lib.mps_keymap_clear(self._map)
        self._size = 0
        self._names.clear()
        self._keys = None
        self._ids = None  # a snapshot may still hold views of its slots
        self._null = None

    def slots(self, keys: Column) -> np.ndarray:
        """The slot of every key (int64), inserting new keys."""
        kind = "str" if isinstance(keys, StringColumn) else keys.dtype.str
        if kind != "str" and keys.dtype.kind not in "biu":
            raise AggregateError(f"key column {self.key!r} has dtype {keys.dtype}; keys must be int, bool or str")
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise AggregateError(f"key column {self.key!r} changed type from {self.kind} to {kind}")
        nulls = null_mask(keys)
        if nulls is not None and nulls.any():
            slots = np.empty(len(keys), np.int64)
            valid = np.flatnonzero(~nulls)
            slots[valid] = self.slots(values_of(keys).take(valid) if kind == "str" else values_of(keys)[valid])
            slots[nulls] = self._null_slot(kind)
            return slots
        keys = values_of(keys)
        ids = hash_column(keys) if kind == "str" else np.ascontiguousarray(keys, np.int64).view(np.uint64)
        slots = np.empty(len(ids), np.int64)
        size = lib.mps_keymap_insert(self._map, _ptr("uint64_t[]", ids), len(ids), _ptr("int64_t[]", slots))
        if size < 0:
            raise MemoryError(f"aggregation by {self.key!r}: out of memory for its key map")
        if size > self._size and kind == "str":  # remember the string of each new slot (its first row)
            new = np.flatnonzero(slots >= self._size)
            _, first = np.unique(slots[new], return_index=True)
            self._names.append(keys.take(new[first]))
        self._size = size
        return slots

    def _null_slot(self, kind: str) -> int:
        if self._null is None:
            self._null = lib.mps_keymap_reserve(self._map)
            if self._null < 0:
                raise MemoryError(f"aggregation by {self.key!r}: out of memory for its key map")
            self._size += 1
            if kind == "str":
                self._names.append(StringColumn(np.zeros(2, np.int64), np.zeros(0, np.uint8), np.ones(1, bool)))
        return self._null

    def _int_keys(self) -> np.ndarray:
        """The key (as uint64) of every slot: a view of a buffer the keys are appended to,
        with room to grow, so only new keys are fetched. Views handed out before (a snapshot
        being written) cover slots that are never written again; ``clear`` drops the buffer."""
        have, ids = (0, None) if self._ids is None else self._ids
        if ids is None or len(ids) < self._size:
            grown = np.empty(max(2 * self._size, 1024), np.uint64)  # pages untouched until used
            if ids is not None:
                grown[:have] = ids[:have]
            grown.flags.writeable = False  # its views stay read-only: only the key map writes here
            ids = grown
        if self._size > have:
            lib.mps_keymap_keys(self._map, have, _ptr("uint64_t[]", ids[have:]), len(ids) - have)
        self._ids = (self._size, ids)
        return ids[: self._size]

    def keys(self, slots: np.ndarray | None = None) -> Column:
        """The key of every slot (or of the given slots), as a column of the key's type."""
        keys = self._keys
        if keys is None or len(keys) != self._size:  # made again only after new keys came
            if self.kind == "str":
                keys = self._names[0] if len(self._names) == 1 else StringColumn.concat(self._names)
                self._names = [keys]
            else:
                keys = self._int_keys().view(np.int64).astype(np.dtype(self.kind or "<i8"), copy=False)
                keys.flags.writeable = False
                if self._null is not None:
                    mask = np.zeros(len(keys), bool)
                    mask[self._null] = True
                    keys = np.ma.MaskedArray(keys, mask=mask)
            self._keys = keys
        if slots is None:
            return keys
        return keys.take(slots) if isinstance(keys, StringColumn) else keys[slots]


class Accumulators:
    """The accumulators of an aggregation spec over an index space of any shape: ``count`` and,
    per value column, its ``sum``, ``min`` and ``max`` as the functions need, each an array of
    ``shape`` updated in place by C scatter kernels at flat indices (``acc.reshape(-1)[i]``).

    Accumulators are int64 (signed ints and bools, exact), uint64 or float64; when a batch
    brings another kind than an accumulator holds, it widens as numpy promotes (ints and floats,
    or signed and unsigned, to float64), so mixed input gives what numpy gives for the
    concatenated column. Cells never updated (count 0) hold the identity of their operation.

    Nulls are skipped, as SQL does: a value column that brings nulls gets a ``{column}.nulls``
    partial (its null values per cell), so ``count(column)`` counts the values that are not
    null (``count(*)`` counts rows), and sum, min, max and mean over no value are null.
    """

    def __init__(self, items: tuple[tuple[str, str], ...], shape: tuple[int, ...]) -> None:
        self.items = items
        self.columns_needs = {column: list(dict.fromkeys(need for c, func in items if c == column
                                                         for need in _NEEDS[func]))
                              for column in dict.fromkeys(c for c, _ in items if c != "*")}  # value columns
        self.partials = tuple(dict.fromkeys(f"{column}.{need}" for column, func in items for need in _NEEDS[func]))
        self.shape = shape
        self.count = np.zeros(shape, np.int64)
        self._acc: dict[str, np.ndarray] = {}
        self.known = False  # a batch (even without rows) has fixed the dtypes

    def _array(self, name: str, dtype: np.dtype) -> np.ndarray:
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = np.full(self.shape, _identity(name, dtype), dtype)
        return acc

    def resize(self, shape: tuple[int, ...]) -> None:
        """A new shape; the cells of the old one keep their place (by position in each axis)."""
        common = tuple(slice(0, min(a, b)) for a, b in zip(self.shape, shape))
        count = np.zeros(shape, np.int64)
        count[common] = self.count[common]
        self.count = count
        for name, acc in self._acc.items():
            new = np.full(shape, _identity(name, acc.dtype), acc.dtype)
            new[common] = acc[common]
            self._acc[name] = new
        self.shape = shape

    def reset(self, where: object) -> None:
        """Empties the cells selected by ``where`` (an index expression on the arrays)."""
        self.count[where] = 0
        for name, acc in self._acc.items():
            acc[where] = _identity(name, acc.dtype)

    def add(self, index: np.ndarray, batch: Batch) -> None:
        """Raw rows: row i goes to flat cell index[i]."""
        self.known = True
        lib.mps_scatter_add_i64(_ptr("int64_t[]", self.count.reshape(-1)), _ptr("int64_t[]", index), ffi.NULL,
                                len(index))
        for column, needs in self.columns_needs.items():
            values = _column(batch, column)
            nulls, rows = null_mask(values), index
            values = values_of(values)
            if nulls is not None:
                self._array(f"{column}.{_NULLS}", np.dtype(np.int64))  # nullable from now on
                if nulls.any():
                    self._combine(f"{column}.{_NULLS}", "sum", index[nulls], np.ones(int(nulls.sum()), np.int64))
                    rows, values = index[~nulls], values[~nulls]
            if needs:
                values = _numeric(column, values)
                for need in needs:
                    self._combine(f"{column}.{need}", need, rows, values)

    def merge(self, index: np.ndarray, partials: Mapping[str, np.ndarray]) -> None:
        """Partial rows (as :meth:`partial_columns` makes): row i goes to flat cell index[i]. A
        partial column missing is one no row ever reached (its count is 0): nothing to add."""
        self.known = True
        lib.mps_scatter_add_i64(_ptr("int64_t[]", self.count.reshape(-1)), _ptr("int64_t[]", index),
                                _ptr("int64_t[]", np.ascontiguousarray(partials[_COUNT], np.int64)), len(index))
        ours = {*self.partials, *(f"{column}.{_NULLS}" for column in self.columns_needs)}
        for partial in partials:  # in the sender's order, which new accumulators then keep
            if partial in ours:
                self._combine(partial, _part_op(partial), index, values_of(partials[partial]))

    def _combine(self, name: str, need: str, index: np.ndarray, values: np.ndarray) -> None:
        """acc[index] op= values in one C pass, widening the accumulator first if need be."""
        kind = _ACCUMULATOR_DTYPE[values.dtype.kind]
        acc = self._acc.get(name)
        if acc is not None and acc.dtype != kind:
            kind = np.result_type(acc.dtype, kind)
            if kind != acc.dtype:
                acc = self._widen(name, kind)
        flat = self._array(name, kind).reshape(-1)
        values = np.ascontiguousarray(values).astype(kind, copy=False)
        if kind == np.uint64 and need != "sum":  # unsigned order differs from int64's
            (np.minimum if need == "min" else np.maximum).at(flat, index, values)
            return
        as_c = np.float64 if kind == np.float64 else np.int64  # uint64 sums: the same bits as int64's
        ctype = "double" if as_c is np.float64 else "int64_t"
        _KERNELS[need][as_c](_ptr(f"{ctype}[]", flat.view(as_c)), _ptr("int64_t[]", index),
                             _ptr(f"{ctype}[]", values.view(as_c)), len(index))

    def _widen(self, name: str, dtype: np.dtype) -> np.ndarray:
        """Converts an accumulator to dtype; empty cells get dtype's identity (not the converted
        identity of the old dtype: int64's max is no float +inf)."""
        acc = self._acc[name].astype(dtype)
        nulls = self._acc.get(f"{name.rsplit('.', 1)[0]}.{_NULLS}", 0)
        acc[self.count - nulls == 0] = _identity(name, acc.dtype)
        self._acc[name] = acc
        return acc

    def partial_columns(self, where: object, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """count and every partial accumulator at ``where`` (copies), for :meth:`merge`. With
        ``into`` (name -> array, the caller's to lend), each copy goes into the leading cells of
        its array there, which is made (with room for the accumulators' capacity) where it is
        missing or too small: memory used before costs no page faults."""
        if into is None:
            return {name: np.array(part) for name, part in self.parts(where).items()}
        out = {}
        for name, part in self.parts(where).items():
            buffer = into.get(name)
            if buffer is None or buffer.dtype != part.dtype or len(buffer) < len(part):
                buffer = into[name] = np.empty(max(len(part), self.shape[0]), part.dtype)
            out[name] = buffer[: len(part)]
            np.copyto(out[name], part)
        return out

    def result_columns(self, where: object, reduce: str | None = None) -> dict[str, np.ndarray]:
        """``{column}_{function}`` (``count`` for "*") at ``where``; with ``reduce="panes"``,
        ``where`` selects rows of a 2-D array and each column is combined over them first
        (the panes of a window)."""
        parts = self.parts(where)
        return self.columns(parts if reduce is None else fold_parts(parts))

    def parts(self, where: object) -> dict[str, np.ndarray]:
        """count and every partial accumulator at ``where``: views or copies, as numpy indexes."""
        return {_COUNT: self.count[where], **{name: acc[where] for name, acc in self._acc.items()}}

    def stack(self, rows: Sequence[int | None], buffers: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The parts of these rows of a 2-D index space, one array row each (a None row is
        empty: the identities). With ``buffers`` (name -> array, kept by the caller), written
        into their leading rows, reallocated when they do not fit: fresh memory costs a page
        fault per page."""
        out = {}
        for name, acc in {_COUNT: self.count, **self._acc}.items():
            buffer = None if buffers is None else buffers.get(name)
            if buffer is None or buffer.dtype != acc.dtype or buffer.shape[1] != acc.shape[1] or len(buffer) < len(rows):
                buffer = np.empty((len(rows), acc.shape[1]), acc.dtype)
                if buffers is not None:
                    buffers[name] = buffer
            stacked = buffer[: len(rows)]
            for i, row in enumerate(rows):
                if row is None:
                    stacked[i] = _identity(name, acc.dtype)
                else:
                    stacked[i] = acc[row]
            out[name] = stacked
        return out

    def columns(self, parts: Mapping[str, np.ndarray], copy: bool = True) -> dict[str, np.ndarray]:
        """The result columns of parts (as :meth:`parts` gives); ``copy=False`` when the parts
        are the caller's to give away."""
        counts = parts[_COUNT]
        own = np.array if copy else np.asarray
        cols: dict[str, np.ndarray] = {}
        for column, func in self.items:
            if column == "*":
                cols[_COUNT] = own(counts)
                continue
            nulls = parts.get(f"{column}.{_NULLS}")
            valid = counts if nulls is None else counts - nulls  # the values that are not null
            if func == "count":
                cols[f"{column}_count"] = own(valid) if nulls is None else valid
                continue
            values = parts.get(f"{column}.{_NEEDS[func][0]}")
            if values is None:  # no value yet, only nulls
                values = np.zeros(len(counts))
            if func == "mean":
                with np.errstate(invalid="ignore", divide="ignore"):
                    out = values / valid
            else:
                out = own(values)
            cols[f"{column}_{func}"] = out if nulls is None else np.ma.MaskedArray(out, mask=valid == 0)
        return cols


def scan_parts(parts: dict[str, np.ndarray], reverse: bool = False) -> dict[str, np.ndarray]:
    """Running combinations of stacked parts along their first axis, in place (from the last
    row back with ``reverse``): row i becomes the combination of rows 0..i (or i..end)."""
    for name, p in parts.items():
        op = _UFUNCS[name.rsplit(".", 1)[-1]]
        order = range(len(p) - 2, -1, -1) if reverse else range(1, len(p))
        step = 1 if reverse else -1
        for i in order:  # row by row: each a contiguous pass (accumulate along axis 0 is not)
            op(p[i], p[i + step], out=p[i])
    return parts


def fold_parts(parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked parts combined along their first axis into one row."""
    return {name: _UFUNCS[name.rsplit(".", 1)[-1]].reduce(p, axis=0) for name, p in parts.items()}


def combine_parts(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """a and b combined cell by cell (same names and shapes)."""
    return {name: _UFUNCS[name.rsplit(".", 1)[-1]](a[name], b[name]) for name in a}


class KeyedAggregate:
    """Per-key accumulators for one aggregation (see the module doc): a :class:`KeyIndex` and
    one-dimensional :class:`Accumulators` indexed by slot."""

    def __init__(self, key: str, spec: Mapping[str, str | Sequence[str]], expected_keys: int = 1024,
                 track_changes: bool = False) -> None:
        self.key = key
        self.items = parse_spec(spec)
        self.index = KeyIndex(key, expected_keys)
        self.acc = Accumulators(self.items, (1024,))
        self.partials = self.acc.partials
        self._changed = np.zeros(1024 if track_changes else 0, bool)  # per slot: changed since take_changes()
        self._tracking = track_changes

    def __len__(self) -> int:
        return len(self.index)

    def clear(self) -> None:
        """Forgets every key, keeping the memory of the key map and accumulators for reuse."""
        self.acc.reset(slice(0, len(self.index)))
        self._changed[: len(self.index)] = False
        self.index.clear()

    def _slots(self, keys: Column) -> np.ndarray:
        slots = self.index.slots(keys)
        size = len(self.index)
        if size > self.acc.shape[0]:
            self.acc.resize((max(size, 2 * self.acc.shape[0]),))
        if self._tracking:
            if size > len(self._changed):
                self._changed = np.concatenate([self._changed, np.zeros(max(size, len(self._changed)), bool)])
            self._changed[slots] = True
        return slots

    # ---- input ------------------------------------------------------------------------------

    def update(self, batch: Batch) -> None:
        """Adds raw rows. A batch without rows still fixes the key's and the values' dtypes,
        so an empty result keeps its schema."""
        self.acc.add(self._slots(_key_of(batch, self.key)), batch)

    def merge(self, partials: Batch) -> None:
        """Adds the partials (a batch from :meth:`partial`) of another instance."""
        self.acc.merge(self._slots(_key_of(partials, self.key)), partials)

    # ---- output -----------------------------------------------------------------------------

    def partial(self, into: dict[str, np.ndarray] | None = None, copy: bool = True) -> Batch:
        """The state as a batch of partials: key, count and each partial accumulator (copied
        into the arrays of ``into``, as :meth:`Accumulators.partial_columns` says; with
        ``copy=False`` views of the accumulators themselves, for a caller that updates this
        aggregate no more)."""
        where = slice(0, len(self.index))
        parts = self.acc.partial_columns(where, into) if copy else self.acc.parts(where)
        return Batch({self.key: self.index.keys(), **parts})

    def result(self, slots: np.ndarray | None = None) -> Batch | None:
        """key, then one column per (column, function): ``{column}_{function}``, or ``count``;
        for every key, or for the keys of ``slots``. None before any batch arrived (no schema
        known); zero rows with every column after batches without rows."""
        if self.index.kind is None:
            return None
        where = slice(0, len(self.index)) if slots is None else slots
        return Batch({self.key: self.index.keys(slots), **self.acc.result_columns(where)})

    def take_changes(self) -> Batch | None:
        """The result rows of the keys that changed since the last call (``track_changes``),
        or None when none did."""
        changed = np.flatnonzero(self._changed[: len(self.index)])
        if not len(changed):
            return None
        self._changed[changed] = False
        return self.result(changed)

    def forget_changes(self) -> None:
        """Marks every key unchanged (restored state that was emitted before its checkpoint)."""
        self._changed[: len(self.index)] = False


_KERNELS = {
    "sum": {np.float64: lib.mps_scatter_add_f64, np.int64: lib.mps_scatter_add_i64},
    "min": {np.float64: lib.mps_scatter_min_f64, np.int64: lib.mps_scatter_min_i64},
    "max": {np.float64: lib.mps_scatter_max_f64, np.int64: lib.mps_scatter_max_i64},
}


#: A combiner whose int keys all lie in 0 .. DIRECT_KEYS - 1 (and below its ``max_keys``)
#: indexes its accumulators by the key itself, as numpy's ``bincount`` does, and needs no key
#: map: a fold is then one pass per accumulator. 2**17 cells of 8 bytes make one MiB per
#: accumulator, which stays in a core's L2 cache (a sparser or larger key space is better served
#: by the key map's dense slots). The first key outside that range, or a key column that is not
#: a non-null int, moves the combiner to its key map for good, with what it holds.
DIRECT_KEYS = 1 << 17


class Combiner:
    """Pre-aggregates rows into one partial row per key (Flink's local aggregation), so a hot
    key crosses a shuffle once per flush instead of once per row.

    :meth:`add` takes raw rows and returns the partials when a bound is reached: the combiner
    holds ``max_keys`` keys (memory), or its oldest row
    has waited ``max_delay_s`` (latency). :attr:`due` says when the held rows must go on; the
    :class:`~mpstream.operators.Combine` operator sets a timer for it and also flushes before
    checkpoint barriers and at the end. Small non-negative int keys are folded without a key
    map (:data:`DIRECT_KEYS`), and their partials come in key order; once the combiner uses its
    key map, they come in the map's order (first appearance, the keys it took over first).

    >>> c = Combiner("k", {"v": "sum", "*": "count"})
    >>> c.add(Batch({"k": np.array([8, 7, 8]), "v": np.array([1.0, 2.0, 3.0])})) is None
    True
    >>> p = c.flush()
    >>> p["k"].tolist(), p["v.sum"].tolist(), p["count"].tolist(), c.flush()
    ([7, 8], [2.0, 4.0], [1, 2], None)
    """

    def __init__(self, key: str, spec: Mapping[str, str | Sequence[str]], max_delay_s: float = 0.1,
                 max_keys: int = 1 << 20) -> None:
        self._agg = KeyedAggregate(key, spec)
        self.max_delay_s = max_delay_s
        self.max_keys = max_keys
        self._direct: Accumulators | None = Accumulators(self._agg.items, (0,))  # indexed by key; None: left
        self._direct_cells = 0  # 1 + the largest key held by _direct
        self._direct_key: np.dtype | None = None  # the key column's dtype
        self._since: float | None = None  # time.time() when the oldest unflushed row arrived
        self._ended = False  # flush(last=True) came: the input ended

    @property
    def due(self) -> float | None:
        """The ``time.time()`` by which the held rows must go on; None when none are held."""
        return None if self._since is None else self._since + self.max_delay_s

    def add(self, batch: Batch) -> Batch | None:
        """Takes raw rows; returns the partials (see :meth:`flush`) when a bound is reached."""
        if self._ended:
            raise RuntimeError("this combiner's last flush came (its input ended): it takes no more rows")
        if not self._add_direct(batch):
            self._agg.update(batch)  # a batch without rows still fixes the dtypes
        if batch.num_rows == 0:
            return None
        if self._since is None:
            self._since = time.time()
        if self._full() or time.time() - self._since >= self.max_delay_s:
            return self.flush()
        return None

    def flush(self, last: bool = False) -> Batch | None:
        """The partials of every row since the last flush (a batch as
        :meth:`KeyedAggregate.partial` makes, one row per key), or None when there are none.
        ``last``: the input ended, and the combiner takes no more rows; the key map's partials
        are then its accumulators themselves, not copies."""
        self._ended |= last
        if self._since is None:
            return None
        if self._direct is not None:
            partials = self._direct_partials()
            if not last:
                self._direct.reset(slice(0, self._direct_cells))
                self._direct_cells = 0
        else:
            partials = self._agg.partial(copy=not last)
            if not last:
                self._agg.clear()
        self._since = None
        return partials

    def empty(self) -> Batch | None:
        """Partials without rows, with the columns and dtypes seen so far (None: none seen)."""
        if self._direct is not None:
            return self._direct_partials(rows=False)
        return None if self._agg.result() is None else self._agg.partial()

    def _add_direct(self, batch: Batch) -> bool:
        """Folds the batch by key value when its keys allow (:data:`DIRECT_KEYS`); False when
        they do not, having moved what the combiner holds to its key map."""
        if self._direct is None:
            return False
        keys = _key_of(batch, self._agg.key)
        fits = (not isinstance(keys, StringColumn) and null_mask(keys) is None and keys.dtype.kind in "iu"
                and self._direct_key in (None, keys.dtype))
        if fits:
            index = np.ascontiguousarray(keys, np.int64)
            cells = int(index.view(np.uint64).max()) + 1 if len(index) else 0  # a negative key is > 2**63 here
            fits = cells <= min(DIRECT_KEYS, self.max_keys)
        if not fits:
            self._leave_direct()
            return False
        if cells > self._direct.shape[0]:
            self._direct.resize((min(DIRECT_KEYS, max(cells, 2 * self._direct.shape[0], 1024)),))
        self._direct_key = keys.dtype  # first, as the key map fixes its key type before a value column
        self._direct_cells = max(self._direct_cells, cells)  # may raise: the rows counted stay held
        self._direct.add(index, batch)
        return True

    def _leave_direct(self) -> None:
        """Moves what the by-value accumulators hold to the key map, which takes every batch
        from now on."""
        held = self._direct_partials()
        if held is not None:
            self._agg.merge(held)  # a batch without rows still fixes the dtypes
        self._direct = None

    def _direct_partials(self, rows: bool = True) -> Batch | None:
        """What _direct holds, as :meth:`flush` gives it (no rows: the schema alone); None
        before any batch."""
        if self._direct_key is None:
            return None
        keys = np.flatnonzero(self._direct.count[: self._direct_cells]) if rows else np.zeros(0, np.int64)
        return Batch({self._agg.key: keys.astype(self._direct_key), **self._direct.parts(keys)})  # gathered: copies

    def _full(self) -> bool:
        """It holds ``max_keys`` keys (counted by value only when as many cells are in use)."""
        if self._direct is None:
            return len(self._agg) >= self.max_keys
        return (self._direct_cells >= self.max_keys
                and np.count_nonzero(self._direct.count[: self._direct_cells]) >= self.max_keys)


def _key_of(batch: Batch, key: str) -> Column:
    try:
        return batch[key]
    except KeyError:
        raise AggregateError(f"key column {key!r} is not in the batch (columns: {list(batch)})") from None


def _column(batch: Batch, column: str) -> Column:
    try:
        return batch[column]
    except KeyError:
        raise AggregateError(f"aggregated column {column!r} is not in the batch (columns: {list(batch)})") from None


def _numeric(column: str, values: Column) -> np.ndarray:
    if isinstance(values, StringColumn) or values.dtype.kind not in _ACCUMULATOR_DTYPE:
        dtype = "str" if isinstance(values, StringColumn) else values.dtype
        raise AggregateError(f"column {column!r} has dtype {dtype} in this batch, which cannot be summed or "
                             f"compared: aggregate int, bool or float columns (convert it in a map first)")
    return values


def _part_op(name: str) -> str:
    """The scatter kernel of a partial: nulls add up as sums do."""
    op = name.rsplit(".", 1)[1]
    return "sum" if op == _NULLS else op


#: The accumulator dtype for values of each numpy kind.
_ACCUMULATOR_DTYPE = {"b": np.dtype(np.int64), "i": np.dtype(np.int64), "u": np.dtype(np.uint64),
                      "f": np.dtype(np.float64)}


def _identity(name: str, dtype: np.dtype) -> int | float:
    """The neutral element of an accumulator: 0 for sums and counts, +-max for min and max."""
    if name.endswith(".min"):
        return np.inf if dtype.kind == "f" else np.iinfo(dtype).max
    if name.endswith(".max"):
        return -np.inf if dtype.kind == "f" else np.iinfo(dtype).min
    return 0
