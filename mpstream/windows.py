"""Windows on a keyed stream, in event time: assigners, window state, the window operators.

Assigners (times are ints in the event-time column's unit; ``offset`` shifts the alignment):

* :class:`Tumbling` ``(size)``: ``[s, s + size)`` with ``s = floor((ts - offset) / size) * size + offset``.
* :class:`Sliding` ``(size, slide)``: every window ``[s, s + size)`` with ``s`` a multiple of
  ``slide`` (plus offset) and ``s > ts - size``. Kept as **panes** of ``gcd(size, slide)``:
  each row updates exactly one pane, a window combines its ``size / gcd`` panes when it fires,
  so the cost per row does not grow with ``size / slide`` (Arroyo's slices).
* :class:`Session` ``(gap)``: per key, proto-windows ``[ts, ts + gap)`` merged with every
  window they intersect or touch, transitively.
* :class:`Global` ``(count)``: one window per key that fires (and starts over) every ``count``
  rows of the key; what is left fires at the end of the input. ``window_start`` and
  ``window_end`` are the int64 limits.

Firing (``W`` is the window operator's watermark, ``L`` the allowed lateness): a window fires
when ``W >= end`` (an ``on_time`` pane), before the watermark goes downstream. Its state is
kept until ``W >= end + L`` (saturating: no overflow near the int64 limits); a row that
arrives for a window that already fired updates it and fires it again at once (a ``late``
pane with the accumulated value). Rows that are late for every window of theirs (``end + L <=
W`` for each) go to the late side output if one is read, else are counted in
``late_records_dropped``. That decision is taken where rows meet their watermark first, in the
task that feeds the window (chained there): with a forward chain from the sources, against
their own source instance's watermark, so the same input gives the same late rows in every
run, after any restore, with and without salt. Optional early firings (``early_every`` rows or
``early_interval`` seconds of processing time) emit the changed keys of windows still open as
``early`` panes. At the end of the input every window fires; the rows carry ``pane``
(``early`` / ``on_time`` / ``late``).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._mps import lib
from .aggregate import Accumulators, KeyIndex, combine_parts, fold_parts, parse_spec, scan_parts
from .batch import Batch, Column, StringColumn, _ptr, column_numpy
from .errors import PlanError, WindowError
from .operators import Context, Operator, Output, own_rows
from .timers import Timer
from .watermarks import MAX_TIME, MIN_TIME, timestamps

__all__ = ["Tumbling", "Sliding", "Session", "Global", "WindowSplit", "WindowCombine", "WindowAggregate",
           "WindowProcess", "START", "END", "PANE"]

START, END, PANE = "window_start", "window_end", "pane"
EARLY, ON_TIME, LATE = "early", "on_time", "late"
_COUNT = "count"


def saturating_add(a: Any, b: int) -> Any:
    """a + b for int64 scalars or arrays, held at the int64 limits instead of wrapping."""
    if isinstance(a, np.ndarray):
        return np.where(a > MAX_TIME - b, MAX_TIME, a + b) if b >= 0 else np.where(a < MIN_TIME - b, MIN_TIME, a + b)
    return min(MAX_TIME, a + b) if b >= 0 else max(MIN_TIME, a + b)


def _positive(what: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{what} must be a positive int (in the event-time unit), got {value!r}")
    return int(value)


# ---- assigners ----------------------------------------------------------------------------------

class Assigner:
    """Which windows a row of event time ``ts`` belongs to (see the module doc)."""

    kind = ""


@dataclass(frozen=True)
class Tumbling(Assigner):
    size: int
    offset: int = 0
    kind = "panes"

    def __post_init__(self) -> None:
        _positive("a tumbling window's size", self.size)

    @property
    def pane(self) -> int:
        return self.size

    @property
    def slide(self) -> int:
        return self.size


@dataclass(frozen=True)
class Sliding(Assigner):
    size: int
    slide: int
    offset: int = 0
    kind = "panes"

    def __post_init__(self) -> None:
        _positive("a sliding window's size", self.size)
        _positive("a sliding window's slide", self.slide)
        if self.slide > self.size:
            raise PlanError(f"a sliding window's slide ({self.slide}) is larger than its size ({self.size}): rows "
                            f"between windows would belong to none; use a smaller slide or a tumbling window")

    @property
    def pane(self) -> int:
        return math.gcd(self.size, self.slide)


@dataclass(frozen=True)
class Session(Assigner):
    gap: int
    kind = "sessions"

    def __post_init__(self) -> None:
        _positive("a session window's gap", self.gap)


@dataclass(frozen=True)
class Global(Assigner):
    count: int
    kind = "count"

    def __post_init__(self) -> None:
        _positive("a global window's count", self.count)


def _number(ts: np.ndarray, step: int, offset: int) -> np.ndarray:
    """floor((ts - offset) / step): which step-long interval (aligned at offset) each time is
    in; interval q starts at ``q * step + offset % step``. No overflow: the caller keeps ts at
    least a window above the smallest int64 (:func:`_check_range`)."""
    return (ts - offset % step) // step


def _floor(ts: np.ndarray, step: int, offset: int) -> np.ndarray:
    """The start of each time's step-long interval (see :func:`_number`)."""
    return _number(ts, step, offset) * step + offset % step


def _check_range(ts: np.ndarray, assigner: Assigner, where: str) -> None:
    """Windows start below a row's time; a window starting below the smallest int64 cannot be
    told apart (its start would wrap): such times are an error naming the column."""
    reach = getattr(assigner, "size", 0) + getattr(assigner, "slide", 0)
    if len(ts) and int(ts.min()) < MIN_TIME + reach:
        raise WindowError(f"{where}: event time {int(ts.min())} is within {reach} of the smallest int64, so its "
                          f"window would start below it; shift the timestamps")


# ---- output -------------------------------------------------------------------------------------

_STRINGS: dict[str, StringColumn] = {}  # value -> the longest column of it made so far (read-only)


def _string(value: str, n: int) -> StringColumn:
    """A column of n copies of an ASCII value: a view of a column made once (and again when a
    longer one is needed), not built row by row."""
    column = _STRINGS.get(value)
    if column is None or len(column.offsets) <= n:
        raw = np.frombuffer(value.encode(), np.uint8)
        size = max(n, 2 * (len(column.offsets) - 1) if column is not None else 1024)
        offsets, data = np.arange(size + 1, dtype=np.int64) * len(raw), np.tile(raw, size)
        offsets.flags.writeable = data.flags.writeable = False
        column = _STRINGS[value] = StringColumn(offsets, data)
    width = len(value)
    return StringColumn(column.offsets[: n + 1], column.data[: n * width])


def _window_rows(key: str, keys: Column, start: Any, end: Any, columns: Mapping[str, np.ndarray], pane: str,
                 time_dtype: np.dtype) -> Batch:
    """Result rows: the key, window_start, window_end, the aggregates and the pane timing."""
    n = len(keys)
    starts = np.full(n, start, np.int64).view(time_dtype) if np.ndim(start) == 0 else np.asarray(start).view(time_dtype)
    ends = np.full(n, end, np.int64).view(time_dtype) if np.ndim(end) == 0 else np.asarray(end).view(time_dtype)
    return Batch({key: keys, START: starts, END: ends, **columns, PANE: _string(pane, n)})


# ---- tumbling and sliding windows: panes --------------------------------------------------------

class PaneTable:
    """The accumulators of every (key, pane): a :class:`KeyIndex` and 2-D
    :class:`Accumulators`, one row per live pane and one column per key slot (pane-major, so a
    window's panes are whole rows). Panes are numbered: pane q starts at ``q * g + r``. With
    ``track_changes``, ``changed`` marks cells updated since the last early firing."""

    def __init__(self, key: str, items: tuple[tuple[str, str], ...], g: int, r: int,
                 track_changes: bool = False) -> None:
        self.index = KeyIndex(key)
        self.acc = Accumulators(items, (4, 1024))
        self.g, self.r = g, r
        self.rows: dict[int, int] = {}  # pane start -> row
        self.free = list(range(4))[::-1]
        self.changed = np.zeros((4, 1024) if track_changes else (0, 0), bool)

    def _capacity(self, keys: int) -> None:
        panes, slots = self.acc.shape
        if keys > slots:
            self._reshape(panes, max(keys, 2 * slots))

    def _reshape(self, panes: int, slots: int) -> None:
        old = self.acc.shape
        self.acc.resize((panes, slots))
        if self.changed.size:
            changed = np.zeros((panes, slots), bool)
            changed[: old[0], : old[1]] = self.changed[: old[0], : old[1]]
            self.changed = changed
        self.free = list(range(panes - 1, old[0] - 1, -1)) + self.free

    def row(self, pane: int) -> int:
        row = self.rows.get(pane)
        if row is None:
            if not self.free:
                self._reshape(2 * self.acc.shape[0], self.acc.shape[1])
            row = self.rows[pane] = self.free.pop()
        return row

    def cells(self, numbers: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Flat cell index of every (pane number, key slot). A batch's panes are usually a few
        neighbours: looked up through a table over their range, not sorted."""
        if not len(numbers):
            return np.zeros(0, np.int64)
        low = int(numbers.min())
        span = int(numbers.max()) - low + 1
        if span <= max(1024, len(numbers)):
            relative = numbers - low
            present = np.zeros(span, bool)
            present[relative] = True
            used = np.flatnonzero(present)
            table = np.zeros(span, np.int64)
            table[used] = [self.row((low + int(u)) * self.g + self.r) for u in used]
            rows = table[relative]
        else:
            used, inverse = np.unique(numbers, return_inverse=True)
            rows = np.array([self.row(int(u) * self.g + self.r) for u in used], np.int64)[inverse]
        self._capacity(len(self.index))
        return rows * self.acc.shape[1] + slots

    def add(self, numbers: np.ndarray, slots: np.ndarray, batch: Batch) -> None:
        cells = self.cells(numbers, slots)
        self.acc.add(cells, batch)
        if self.changed.size:
            self.changed.reshape(-1)[cells] = True

    def merge(self, numbers: np.ndarray, slots: np.ndarray, partials: Mapping[str, np.ndarray]) -> None:
        cells = self.cells(numbers, slots)
        self.acc.merge(cells, partials)
        if self.changed.size:
            self.changed.reshape(-1)[cells] = True

    def drop(self, pane: int) -> None:
        row = self.rows.pop(pane)
        self.acc.reset(row)
        if self.changed.size:
            self.changed[row] = False
        self.free.append(row)

    def window(self, panes: list[int], slots: np.ndarray | None = None,
               changed_only: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """(key slots, result columns) of the window made of these panes: its keys with rows
        (or only ``slots``, or only keys with changed cells), None when it has none."""
        rows = [self.rows[p] for p in panes if p in self.rows]
        if not rows:
            return None
        n = len(self.index)
        if slots is None:
            mask = self.acc.count[rows, :n].sum(axis=0) > 0
            if changed_only:
                mask &= self.changed[rows, :n].any(axis=0)
            slots = np.flatnonzero(mask)
        if not len(slots):
            return None
        return slots, self.acc.result_columns(np.ix_(rows, slots), reduce="panes")

    def partial_rows(self, key: str, pane_column: str, time_dtype: np.dtype,
                     panes: list[int] | None = None) -> Batch | None:
        """Every non-empty (key, pane) as a partial row (for a snapshot or a flush), or those
        of some panes."""
        n = len(self.index)
        parts = []
        for pane in sorted(self.rows if panes is None else panes):
            row = self.rows[pane]
            slots = np.flatnonzero(self.acc.count[row, :n])
            if len(slots):
                parts.append(Batch({key: self.index.keys(slots), pane_column: np.full(len(slots), pane).view(time_dtype),
                                    **self.acc.partial_columns((row, slots))}))
        return Batch.concat(parts) if parts else None


_PANE = "_pane"  # a partial row's pane start


class SlidingFolds:
    """On-time firings of sliding windows of ``n`` > 1 panes, in order, from two folds each
    instead of n panes (the two-stacks idea): with blocks of n panes (block k: panes ``k*n`` to
    ``k*n + n - 1``), the window from pane ``a = k*n + i`` combines the fold of block k's panes
    from i on (the suffix folds of a block, made once per block, kept for its panes with rows
    only) with the fold of block k+1's first i panes (a running prefix, extended by one slide
    per window). So the cost of a window does not grow with size / slide. Folds cover panes of
    fired windows only, which change only by late rows: those drop the folds
    (:meth:`invalidate`), as a wider table does."""

    def __init__(self, table: PaneTable, n: int) -> None:
        self.table, self.n = table, n
        self.block: int | None = None
        self.buffers: dict[str, np.ndarray] = {}  # the suffix folds' memory, reused block after block

    def invalidate(self) -> None:
        self.block = None

    def _with_rows(self, low: int, high: int) -> list[int]:
        """The numbers of the panes low..high-1 that hold rows."""
        table = self.table
        return [q for q in range(low, high) if q * table.g + table.r in table.rows]

    def _stack(self, numbers: list[int], buffers: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        table = self.table
        return table.acc.stack([table.rows[q * table.g + table.r] for q in numbers], buffers)

    def window(self, a: int) -> dict[str, np.ndarray] | None:
        """The parts of the window made of panes a..a+n-1, over every key slot (None: no rows);
        the caller may keep them."""
        n, width = self.n, self.table.acc.shape[1]
        k, i = divmod(a, n)
        if self.block != k or self.width != width or i < self.first:
            self.block, self.width, self.first = k, width, i
            self.present = self._with_rows(a, (k + 1) * n)
            self.suffix = scan_parts(self._stack(self.present, self.buffers), reverse=True) if self.present else {}
            self.prefix, self.prefix_end = None, (k + 1) * n
        j = bisect.bisect_left(self.present, a)  # the suffix from pane a is the one from its first pane with rows
        suffix = {name: part[j] for name, part in self.suffix.items()} if j < len(self.present) else None
        if i == 0:  # a copy: the suffix folds' memory is reused
            return None if suffix is None else {name: part.copy() for name, part in suffix.items()}
        if self.prefix_end < a + n:
            more = self._with_rows(self.prefix_end, a + n)
            if more:
                folded = fold_parts(self._stack(more))
                self.prefix = folded if self.prefix is None else combine_parts(self.prefix, folded)
            self.prefix_end = a + n
        if suffix is None:
            return self.prefix  # never changed in place: a new one replaces it
        if self.prefix is None:
            return {name: part.copy() for name, part in suffix.items()}
        return combine_parts(suffix, self.prefix)


class PaneWindows:
    """Tumbling and sliding windows of one operator instance over a :class:`PaneTable` (see
    the module doc). ``watermark`` is the operator's: windows ending at or before it fired.
    ``early``: keep track of changed cells for early firings."""

    def __init__(self, assigner: Tumbling | Sliding, key: str, items: tuple[tuple[str, str], ...],
                 lateness: int, early: bool = False) -> None:
        self.a, self.key, self.items, self.lateness, self.early_firings = assigner, key, items, lateness, early
        self.size, self.slide, self.g, self.offset = assigner.size, assigner.slide, assigner.pane, assigner.offset
        self.r, self.n = self.offset % self.g, self.size // self.g  # pane alignment, panes per window
        self.clear()
        self.watermark = MIN_TIME
        self.time_dtype = np.dtype(np.int64)

    # ---- arithmetic -------------------------------------------------------------------------

    def _last_start(self, p: Any) -> Any:
        """The start of the last window containing instant (pane) p."""
        return _floor(p, self.slide, self.offset) if isinstance(p, np.ndarray) else \
            int(_floor(np.array([p], np.int64), self.slide, self.offset)[0])

    def last_end(self, p: Any) -> Any:
        """The end of the last window containing p: its state is needed until that + lateness."""
        return saturating_add(self._last_start(p), self.size)

    def first_end(self, p: np.ndarray) -> np.ndarray:
        """The end of the first window containing p (the first to fire)."""
        last = self._last_start(p)
        count = (last - p + self.size + self.slide - 1) // self.slide  # windows containing p
        return saturating_add(last - (count - 1) * self.slide, self.size)

    def windows_of(self, p: int) -> list[int]:
        """The starts of the windows containing pane p."""
        last = self._last_start(p)
        return [s for s in range(last, p - self.size, -self.slide)][::-1]

    def panes_of(self, start: int) -> list[int]:
        return list(range(start, start + self.size, self.g))

    def _rows(self, start: int, slots: np.ndarray | None, columns: dict[str, np.ndarray], pane: str) -> Batch:
        """The result rows of a window for these key slots (None: every key)."""
        return _window_rows(self.key, self.table.index.keys(slots), start, saturating_add(start, self.size), columns,
                            pane, self.time_dtype)

    def _result(self, start: int, pane: str, slots: np.ndarray | None = None,
                changed_only: bool = False) -> Batch | None:
        window = self.table.window(self.panes_of(start), slots, changed_only)
        return None if window is None else self._rows(start, *window, pane)

    def _on_time(self, start: int) -> Batch | None:
        if self.n == 1 or not any(p in self.table.rows for p in self.panes_of(start)):
            return self._result(start, ON_TIME)
        parts = self.folds.window((start - self.r) // self.g)
        if parts is None:
            return None
        m = len(self.table.index)
        active = parts[_COUNT][:m] > 0
        if active.all():  # every key has rows in the window (usual with many rows a window): no gathers
            slots, where = None, slice(0, m)
        else:
            slots = where = np.flatnonzero(active)
            if not len(slots):
                return None
        columns = self.table.acc.columns({name: p[where] for name, p in parts.items()}, copy=False)
        return self._rows(start, slots, columns, ON_TIME)

    # ---- input ------------------------------------------------------------------------------

    def add(self, batch: Batch, ts: np.ndarray | None, partial: bool) -> list[Batch]:
        """Rows (or partial rows) into their panes; the late firings they cause, at once."""
        slots = self.table.index.slots(batch[self.key])
        if partial:
            self.time_dtype = batch[_PANE].dtype
            numbers = _number(batch[_PANE].view(np.int64), self.g, self.r)
            self.table.merge(numbers, slots, batch)
        else:
            _check_range(ts, self.a, f"window of {self.key!r}")
            numbers = _number(ts, self.g, self.offset)
            self.table.add(numbers, slots, batch)
        if self.watermark == MIN_TIME or not len(numbers) or \
                self.first_end(np.array([numbers.min() * self.g + self.r]))[0] > self.watermark:
            return []  # none of these rows is in a window that fired already
        panes = numbers * self.g + self.r
        late = np.flatnonzero(self.first_end(panes) <= self.watermark)
        if len(late):
            self.folds.invalidate()
        out = []
        for p in np.unique(panes[late]).tolist():
            changed = np.unique(slots[late][panes[late] == p])
            for s in self.windows_of(p):
                end = saturating_add(s, self.size)
                if end <= self.watermark < saturating_add(end, self.lateness):
                    out.append(self._result(s, LATE, changed))
        return [b for b in out if b is not None]

    # ---- time -------------------------------------------------------------------------------

    def fire(self, watermark: int) -> list[Batch]:
        """Every window ending in (last watermark, watermark] with rows, on time; then the panes
        no window needs any more (last end + lateness <= watermark) go."""
        return list(self.fire_each(watermark))

    def fire_each(self, watermark: int) -> Iterator[Batch]:
        """As :meth:`fire`, a window at a time: the end of the input fires every window still
        open (size / slide of them per key), and their rows need not all be in memory at once.
        The state is up to date once the iterator is exhausted."""
        rows = self.table.rows
        if rows and watermark > self.watermark:
            low_pane, high_pane = min(rows), max(rows)
            first = max(saturating_add(self.watermark, -self.size) + 1, low_pane - self.size + 1)
            start = self._last_start(first + self.slide - 1) if first > MIN_TIME else self._last_start(low_pane)
            while start <= high_pane and saturating_add(start, self.size) <= watermark:  # ends saturate at +inf
                if saturating_add(start, self.size) > self.watermark:
                    batch = self._on_time(start)
                    if batch is not None:
                        yield batch
                if start > MAX_TIME - self.slide:
                    break
                start += self.slide
        self.watermark = max(self.watermark, watermark)
        for p in [p for p in rows if saturating_add(self.last_end(p), self.lateness) <= self.watermark]:
            self.table.drop(p)

    def early(self) -> list[Batch]:
        """The changed keys of every window still open, as early panes."""
        starts = sorted({s for p in self.table.rows for s in self.windows_of(p)
                         if saturating_add(s, self.size) > self.watermark})
        out = [self._result(s, EARLY, changed_only=True) for s in starts]
        self.table.changed[:] = False
        return [b for b in out if b is not None]

    # ---- state ------------------------------------------------------------------------------

    def partials(self) -> Batch | None:
        return self.table.partial_rows(self.key, _PANE, self.time_dtype)

    def take(self, watermark: int | None = None) -> Batch | None:
        """The partial rows of the panes a window that ``watermark`` fires holds (of every pane
        when None), taken out of the state."""
        if watermark is None:
            out = self.partials()
            self.clear()
            return out
        due = [p for p in self.table.rows if self.first_end(np.array([p], np.int64))[0] <= watermark]
        out = self.table.partial_rows(self.key, _PANE, self.time_dtype, due) if due else None
        for p in due:
            self.table.drop(p)
        return out

    def clear(self) -> None:
        self.table = PaneTable(self.key, self.items, self.g, self.r, self.early_firings)
        self.folds = SlidingFolds(self.table, self.n)

    def __len__(self) -> int:
        return len(self.table.rows)


# ---- session windows ----------------------------------------------------------------------------

class SessionWindows:
    """Session windows of one operator instance: a table of sessions (key slot, start, end,
    ``emitted``: its contents went out; ``late``: a pane of it went out before, so the next one
    is late) with their accumulators. A batch of rows (proto-windows ``[ts, ts + gap)``) or of
    partial sessions is merged with the sessions of its keys in one vectorized pass (sorted by
    slot and start, grouped by the C kernel ``mps_session_groups``)."""

    def __init__(self, assigner: Session, key: str, items: tuple[tuple[str, str], ...], lateness: int) -> None:
        self.gap, self.key, self.items, self.lateness = assigner.gap, key, items, lateness
        self.index = KeyIndex(key)
        self.slot = np.zeros(0, np.int64)
        self.start = np.zeros(0, np.int64)
        self.end = np.zeros(0, np.int64)
        self.emitted = np.zeros(0, bool)
        self.late = np.zeros(0, bool)
        self.acc = Accumulators(items, (0,))
        self.watermark = MIN_TIME
        self.time_dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return len(self.slot)

    def add(self, batch: Batch, ts: np.ndarray | None, partial: bool) -> list[Batch]:
        """Merges rows (or partial sessions) into the sessions of their keys; a session they
        change that ended already (end <= watermark) fires again at once, as a late pane."""
        slots = self.index.slots(batch[self.key])
        if partial:
            self.time_dtype = batch[START].dtype
            start, end = batch[START].view(np.int64), batch[END].view(np.int64)
        else:
            start, end = ts, saturating_add(ts, self.gap)
        old = np.flatnonzero(np.isin(self.slot, np.unique(slots)))  # the sessions of these keys
        kept = np.setdiff1d(np.arange(len(self.slot)), old, assume_unique=True)
        n_old = len(old)
        cat_slot = np.concatenate([self.slot[old], slots])
        cat_start = np.concatenate([self.start[old], start])
        cat_end = np.concatenate([self.end[old], end])
        order = np.lexsort((cat_start, cat_slot))
        group = np.empty(len(order), np.int64)
        groups = lib.mps_session_groups(_ptr("int64_t[]", cat_slot[order]), _ptr("int64_t[]", cat_start[order]),
                                        _ptr("int64_t[]", cat_end[order]), len(order), _ptr("int64_t[]", group))
        bounds = np.flatnonzero(np.diff(group, prepend=-1))
        g_slot, g_start = cat_slot[order][bounds], cat_start[order][bounds]
        g_end = np.maximum.reduceat(cat_end[order], bounds) if len(bounds) else cat_end[:0]
        of_row = np.empty(len(order), np.int64)  # row of the concatenation -> its group
        of_row[order] = group
        g_changed = np.zeros(groups, bool)  # groups holding new rows
        g_changed[of_row[n_old:]] = True
        g_late = np.zeros(groups, bool)  # a member went out before
        np.logical_or.at(g_late, of_row[:n_old], self.late[old] | self.emitted[old])
        g_emitted = np.zeros(groups, bool)  # unchanged groups are single old sessions: keep theirs
        g_emitted[of_row[:n_old]] = self.emitted[old]
        g_emitted &= ~g_changed
        acc = Accumulators(self.items, (len(kept) + groups,))
        if len(kept):
            acc.merge(np.arange(len(kept)), self.acc.partial_columns(kept))
        if n_old:
            acc.merge(of_row[:n_old] + len(kept), self.acc.partial_columns(old))
        (acc.merge if partial else acc.add)(of_row[n_old:] + len(kept), batch)
        self.slot = np.concatenate([self.slot[kept], g_slot])
        self.start = np.concatenate([self.start[kept], g_start])
        self.end = np.concatenate([self.end[kept], g_end])
        self.emitted = np.concatenate([self.emitted[kept], g_emitted])
        self.late = np.concatenate([self.late[kept], g_late])
        self.acc = acc
        complete = np.flatnonzero(g_changed & (g_end <= self.watermark)) + len(kept)  # ended already
        self.late[complete] = True
        return [self._rows(complete)] if len(complete) else []

    def _rows(self, sessions: np.ndarray, pane: str | None = None) -> Batch:
        """The result rows of these sessions (pane: late where a pane went out before)."""
        late = self.late[sessions]
        self.emitted[sessions] = True
        self.late[sessions] = True
        batch = _window_rows(self.key, self.index.keys(self.slot[sessions]), self.start[sessions], self.end[sessions],
                             self.acc.result_columns(sessions), pane or ON_TIME, self.time_dtype)
        if pane is None and late.any():
            panes = np.where(late, LATE, ON_TIME).astype(str)
            batch = Batch({**{name: batch[name] for name in batch if name != PANE}, PANE: panes})
        return batch

    def fire(self, watermark: int) -> list[Batch]:
        """Sessions that ended (end <= watermark) with contents not emitted fire (late when a
        pane of theirs went out before); sessions past end + lateness go."""
        self.watermark = max(self.watermark, watermark)
        due = np.flatnonzero((self.end <= self.watermark) & ~self.emitted)
        out = [self._rows(due)] if len(due) else []
        gone = saturating_add(self.end, self.lateness) <= self.watermark
        if gone.any():
            self._keep(np.flatnonzero(~gone))
        return out

    def _keep(self, rows: np.ndarray) -> None:
        acc = Accumulators(self.items, (len(rows),))
        acc.known = self.acc.known
        if len(rows):
            acc.merge(np.arange(len(rows)), self.acc.partial_columns(rows))
        self.slot, self.start, self.end = self.slot[rows], self.start[rows], self.end[rows]
        self.emitted, self.late = self.emitted[rows], self.late[rows]
        self.acc = acc

    def early(self) -> list[Batch]:
        open_ = np.flatnonzero(self.end > self.watermark)
        return [_window_rows(self.key, self.index.keys(self.slot[open_]), self.start[open_], self.end[open_],
                             self.acc.result_columns(open_), EARLY, self.time_dtype)] if len(open_) else []

    def partials(self) -> Batch | None:
        if not len(self.slot):
            return None
        return Batch({self.key: self.index.keys(self.slot), START: self.start.view(self.time_dtype),
                      END: self.end.view(self.time_dtype), **self.acc.partial_columns(slice(None))})

    def take(self, watermark: int | None = None) -> Batch | None:
        """The partial sessions that a session ``watermark`` fires might merge with (those
        starting at or before it; every one when None), taken out of the state."""
        due = np.arange(len(self.slot)) if watermark is None else np.flatnonzero(self.start <= watermark)
        if not len(due):
            return None
        out = Batch({self.key: self.index.keys(self.slot[due]), START: self.start[due].view(self.time_dtype),
                     END: self.end[due].view(self.time_dtype), **self.acc.partial_columns(due)})
        self._keep(np.flatnonzero(self.start > watermark) if watermark is not None else np.zeros(0, np.int64))
        return out

    def flags(self) -> tuple[np.ndarray, np.ndarray]:
        """(emitted, late) of every session, in the order of :meth:`partials`."""
        return self.emitted.copy(), self.late.copy()

    def clear(self) -> None:
        self._keep(np.zeros(0, np.int64))


# ---- count windows ------------------------------------------------------------------------------

class CountWindows:
    """Global windows with a count trigger: per key the accumulators of its open window and how
    many rows it holds; every ``count`` rows of a key fire (and start a new window)."""

    def __init__(self, assigner: Global, key: str, items: tuple[tuple[str, str], ...], lateness: int) -> None:
        self.n, self.key, self.items = assigner.count, key, items
        self.index = KeyIndex(key)
        self.acc = Accumulators(items, (1024,))
        self.time_dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return int((self.acc.count[: len(self.index)] > 0).sum())

    def add(self, batch: Batch, ts: np.ndarray | None, partial: bool) -> list[Batch]:
        slots = self.index.slots(batch[self.key])
        if len(self.index) > self.acc.shape[0]:
            self.acc.resize((max(len(self.index), 2 * self.acc.shape[0]),))
        if not len(slots):
            self.acc.add(slots, batch)
            return []
        order = np.argsort(slots, kind="stable")  # a key's rows keep their order
        sorted_slots = slots[order]
        first = np.flatnonzero(np.diff(sorted_slots, prepend=-1))
        rank = np.arange(len(order)) - np.repeat(first, np.diff(np.append(first, len(order))))
        held = self.acc.count[sorted_slots]  # rows the key's open window holds
        window = (held + rank) // self.n  # 0: the open window; 1, 2, ...: windows started here
        groups, cell = np.unique(sorted_slots * (window.max() + 1) + window, return_inverse=True)
        g_slot, g_window = groups // (window.max() + 1), groups % (window.max() + 1)
        staged = Accumulators(self.items, (len(groups),))
        opened = np.flatnonzero(g_window == 0)
        if len(opened):
            staged.merge(opened, self.acc.partial_columns(g_slot[opened]))
        staged.add(cell[np.argsort(order, kind="stable")], batch)
        full = np.flatnonzero(staged.count == self.n)
        self.acc.reset(g_slot)  # every key's open window is now in staged
        last = np.flatnonzero(np.diff(g_slot, append=-1))  # each key's last window may stay open
        still_open = last[staged.count[last] < self.n]
        if len(still_open):
            self.acc.merge(g_slot[still_open], staged.partial_columns(still_open))
        self.acc.known = True
        if not len(full):
            return []
        return [_window_rows(self.key, self.index.keys(g_slot[full]), MIN_TIME, MAX_TIME, staged.result_columns(full),
                             ON_TIME, self.time_dtype)]

    def fire(self, watermark: int) -> list[Batch]:
        """At the end of the input (+inf) every open window fires with what it holds."""
        if watermark < MAX_TIME:
            return []
        slots = np.flatnonzero(self.acc.count[: len(self.index)] > 0)
        if not len(slots):
            return []
        out = [_window_rows(self.key, self.index.keys(slots), MIN_TIME, MAX_TIME, self.acc.result_columns(slots),
                            ON_TIME, self.time_dtype)]
        self.acc.reset(slots)
        return out

    def early(self) -> list[Batch]:
        return []

    def partials(self) -> Batch | None:
        slots = np.flatnonzero(self.acc.count[: len(self.index)] > 0)
        if not len(slots):
            return None
        return Batch({self.key: self.index.keys(slots), **self.acc.partial_columns(slots)})


# ---- operators ----------------------------------------------------------------------------------

_STATES = {"panes": PaneWindows, "sessions": SessionWindows, "count": CountWindows}


def _last_end(assigner: Assigner, ts: np.ndarray) -> np.ndarray:
    """The end of the last window each row belongs to (a row is late when even that one is)."""
    if assigner.kind == "panes":
        return saturating_add(_floor(ts, assigner.slide, assigner.offset), assigner.size)
    if assigner.kind == "sessions":
        return saturating_add(ts, assigner.gap)
    return np.full(len(ts), MAX_TIME)


class Lateness:
    """Which rows are late for every window of theirs (``last end + lateness <= watermark``):
    they go to the operator's "late" side output when something reads it, else are counted
    (``late_records_dropped``). Runs in the task that feeds a window (see the module doc)."""

    def __init__(self, assigner: Assigner, ts_column: str, lateness: int) -> None:
        self.assigner, self.ts_column, self.lateness = assigner, ts_column, lateness
        self.watermark = MIN_TIME

    def split(self, batch: Batch, ctx: Context) -> tuple[Batch, np.ndarray]:
        """(the rows that are not late, their timestamps)."""
        ts = timestamps(batch, self.ts_column, f"operator {ctx.name!r}")
        _check_range(ts, self.assigner, f"operator {ctx.name!r}, event-time column {self.ts_column!r}")
        if self.watermark == MIN_TIME or not len(ts) or self._live(ts.min(keepdims=True))[0]:
            return batch, ts  # the last end grows with the time: none is late if the earliest is not
        late = ~self._live(ts)
        if not late.any():
            return batch, ts
        if "late" in ctx.ports:
            ctx.side_output("late", batch.filter(late))
        else:
            ctx.counters["late_records_dropped"] = ctx.counters.get("late_records_dropped", 0) + int(late.sum())
        keep = ~late
        return batch.filter(keep), ts[keep]

    def _live(self, ts: np.ndarray) -> np.ndarray:
        """Rows with a window that is still open or within the lateness."""
        return saturating_add(_last_end(self.assigner, ts), self.lateness) > self.watermark


class WindowSplit(Operator):
    """Chained into the task that feeds a window operator: sends on the rows that are not late
    for all their windows, the others to the "late" side output (or counts them)."""

    def __init__(self, assigner: Assigner, ts_column: str, lateness: int) -> None:
        self.lateness = Lateness(assigner, ts_column, lateness)

    def process(self, batch: Batch) -> Output:
        return self.lateness.split(batch, self.ctx)[0]

    def on_watermark(self, watermark: int) -> Output:
        self.lateness.watermark = watermark
        return None

    def snapshot(self) -> Any:
        return self.lateness.watermark

    def restore(self, states: list[Any]) -> None:
        self.lateness.watermark = states[0]


class WindowCombine(Operator):
    """Pre-aggregates rows (or merges partial rows) per (key, pane) or into per-key partial
    sessions, and hands the partials on: those a window may need before the watermark that
    fires it, all of them before every checkpoint barrier, when the oldest has waited
    ``max_delay_s``, and at the end: the first stages of a salted window aggregation. Over rows it also sends late rows aside (see
    :class:`Lateness`)."""

    rescalable = True

    def __init__(self, assigner: Assigner, key: str, spec: Mapping[str, str | Sequence[str]], ts_column: str,
                 lateness: int, inputs: str = "rows", max_delay_s: float = 0.1) -> None:
        self.assigner, self.key, self.spec, self.ts_column = assigner, key, spec, ts_column
        self.inputs, self.max_delay_s = inputs, max_delay_s
        self.lateness = Lateness(assigner, ts_column, lateness)

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.state = _STATES[self.assigner.kind](self.assigner, self.key, parse_spec(self.spec), 0)
        self._timer: Timer | None = None

    def process(self, batch: Batch) -> Output:
        if self.inputs == "rows":
            batch, ts = self.lateness.split(batch, self.ctx)
            if batch.num_rows:
                self.state.time_dtype = batch[self.ts_column].dtype
            self.state.add(batch, ts, partial=False)
        else:
            self.state.add(batch, None, partial=True)
        if len(self.state) and self._timer is None and self.max_delay_s < math.inf:
            self._timer = self.ctx.timers.register_processing_time(time.time() + self.max_delay_s)
        return None

    def _flush(self, watermark: int | None = None) -> Batch | None:
        """The partials (those a window fired by ``watermark`` may need, if given)."""
        out = self.state.take(watermark)
        if not len(self.state) and self._timer is not None:
            self.ctx.timers.delete(self._timer)
            self._timer = None
        return out

    def on_timer(self, timer: Timer) -> Output:
        self._timer = None
        return self._flush()

    def on_watermark(self, watermark: int) -> Output:
        self.lateness.watermark = watermark
        return self._flush(watermark)  # partials go before the watermark that may fire their windows

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        return self._flush()

    def snapshot(self) -> Any:
        return self.lateness.watermark  # its partials went out before the barrier

    def restore(self, states: list[Any]) -> None:
        self.lateness.watermark = min(states)

    def close(self) -> Output:
        return self._flush()


class WindowAggregate(Operator):
    """Windowed keyed aggregation: the windows of ``assigner`` per key, with the aggregates of
    ``spec`` over the rows (or partial rows) of each; fires as the module doc says. Output rows:
    the key, ``window_start``, ``window_end``, the aggregates, ``pane``."""

    rescalable = True

    def __init__(self, assigner: Assigner, key: str, spec: Mapping[str, str | Sequence[str]], ts_column: str,
                 lateness: int, inputs: str = "rows", early_every: int | None = None,
                 early_interval: float | None = None) -> None:
        self.assigner, self.key, self.spec, self.ts_column = assigner, key, spec, ts_column
        self.lateness, self.inputs = lateness, inputs
        self.early_every, self.early_interval = early_every, early_interval

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        items, early = parse_spec(self.spec), self.early_every is not None or self.early_interval is not None
        self.state = PaneWindows(self.assigner, self.key, items, self.lateness, early) if self.assigner.kind == "panes" \
            else _STATES[self.assigner.kind](self.assigner, self.key, items, self.lateness)
        self._since_early = 0
        if self.early_interval is not None:
            ctx.timers.register_processing_time(time.time() + self.early_interval, "early")

    def process(self, batch: Batch) -> Output:
        if self.inputs == "rows":
            ts = None
            if self.ts_column is not None:  # count windows need no time
                ts = timestamps(batch, self.ts_column, f"operator {self.ctx.name!r}")
                if batch.num_rows:
                    self.state.time_dtype = batch[self.ts_column].dtype
            out = self.state.add(batch, ts, partial=False)
            rows = batch.num_rows
        else:
            out = self.state.add(batch, None, partial=True)
            rows = int(np.asarray(batch[_COUNT]).sum())
        self._since_early += rows
        if self.early_every is not None and self._since_early >= self.early_every:
            self._since_early = 0
            out += self.state.early()
        return out

    def on_timer(self, timer: Timer) -> Output:
        self.ctx.timers.register_processing_time(timer.time + self.early_interval, "early")
        self._since_early = 0
        return self.state.early()

    def on_watermark(self, watermark: int) -> Output:
        state = self.state
        return state.fire_each(watermark) if isinstance(state, PaneWindows) else state.fire(watermark)

    def snapshot(self) -> Any:
        state = self.state
        flags = state.flags() if isinstance(state, SessionWindows) else None
        return {"watermark": getattr(state, "watermark", MIN_TIME), "partials": state.partials(), "flags": flags}

    def restore(self, states: list[Any]) -> None:
        state = self.state
        for saved in states:
            if saved is None:
                continue
            partials = saved["partials"]
            if saved["flags"] is not None and partials is not None:  # sessions: with their emitted / late flags
                partials = Batch({**partials, "_emitted": saved["flags"][0], "_late": saved["flags"][1]})
            mine = own_rows(self.ctx, self.key, partials)
            if mine is not None:
                if isinstance(state, SessionWindows):
                    state.add(Batch({k: v for k, v in mine.items() if k not in ("_emitted", "_late")}), None, True)
                    state.emitted[-mine.num_rows:] = mine["_emitted"]
                    state.late[-mine.num_rows:] = mine["_late"]
                elif isinstance(state, PaneWindows):
                    state.add(mine, None, partial=True)
                else:
                    slots = state.index.slots(mine[self.key])
                    state.acc.resize((max(len(state.index), state.acc.shape[0]),))
                    state.acc.merge(slots, mine)
        if hasattr(state, "watermark"):
            state.watermark = min((s["watermark"] for s in states if s is not None), default=MIN_TIME)


def _rows_of(key_values: np.ndarray, key: object) -> np.ndarray:
    """Where a key column (as numpy, masked where null) holds key; None is the null key (a
    masked array compares nothing equal to None, so a null key's window got no rows)."""
    nulls = np.ma.getmaskarray(key_values)
    return nulls.copy() if key is None else (np.ma.getdata(key_values) == key) & ~nulls


class WindowProcess(Operator):
    """A user function over the rows of each window: ``fn(key, window_start, window_end,
    rows) -> Output`` when the window fires (again, with every row so far, at a late firing).
    Its output rows get the key, ``window_start``, ``window_end`` and ``pane`` in front."""

    rescalable = True

    def __init__(self, assigner: Assigner, key: str, fn: Callable[[Any, Any, Any, Batch], Output], ts_column: str,
                 lateness: int) -> None:
        self.assigner, self.key, self.fn, self.ts_column, self.lateness = assigner, key, fn, ts_column, lateness

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.windows = _STATES[self.assigner.kind](self.assigner, self.key, (("*", "count"),), self.lateness)
        self.rows: list[Batch] = []  # buffered rows, owned copies

    def _ts(self, batch: Batch) -> np.ndarray:
        if self.ts_column is None:  # count windows: rows need no time
            return np.zeros(batch.num_rows, np.int64)
        if batch.num_rows:
            self.windows.time_dtype = batch[self.ts_column].dtype
        return timestamps(batch, self.ts_column, f"operator {self.ctx.name!r}")

    def process(self, batch: Batch) -> Output:
        ts = self._ts(batch)
        if batch.num_rows:
            self.rows.append(batch.copy())
        return self._call(self.windows.add(batch, ts, partial=False))

    def on_watermark(self, watermark: int) -> Output:
        out = self._call(self.windows.fire(watermark))
        if self.assigner.kind != "count" and self.rows:
            self._forget()
        return out

    def _forget(self) -> None:
        """Drops buffered rows no live window holds any more."""
        rows = Batch.concat(self.rows)
        ts = self._ts(rows)
        if self.assigner.kind == "panes":
            live = saturating_add(_last_end(self.assigner, ts), self.lateness) > self.windows.watermark
        else:
            slots = self.windows.index.slots(rows[self.key])
            live = np.zeros(len(ts), bool)
            for slot, start, end in zip(self.windows.slot, self.windows.start, self.windows.end):
                live |= (slots == slot) & (ts >= start) & (ts < end)
        self.rows = [rows.filter(live)] if live.any() else []

    def _call(self, fired: list[Batch]) -> list[Batch]:
        """Runs fn for every fired window (a row of ``fired``: key, bounds, pane)."""
        if not fired or not self.rows:
            return []
        rows = Batch.concat(self.rows)
        ts = self._ts(rows)
        key_values = column_numpy(rows[self.key])
        out = []
        for windows in fired:
            wkeys = column_numpy(windows[self.key])
            for i, (k, start, end, pane) in enumerate(zip(wkeys.tolist(), windows[START].view(np.int64).tolist(),
                                                          windows[END].view(np.int64).tolist(),
                                                          windows[PANE].to_numpy().tolist())):
                keyed = _rows_of(key_values, k)
                mine = keyed & (ts >= start) & (ts < end)
                if self.assigner.kind == "count":  # the key's oldest count rows
                    mine &= np.cumsum(keyed) <= self.assigner.count
                dtype = self.windows.time_dtype
                result = self.fn(k, np.int64(start).view(dtype), np.int64(end).view(dtype), rows.filter(mine))
                for batch in [] if result is None else [result] if isinstance(result, (Batch, Mapping)) else result:
                    batch = batch if isinstance(batch, Batch) else Batch(batch)
                    n = batch.num_rows
                    column = windows[self.key]
                    out.append(Batch({self.key: column.take(np.full(n, i, np.int64)) if isinstance(
                        column, StringColumn) else np.repeat(column[i:i + 1], n),
                        START: np.repeat(np.int64(start), n).view(self.windows.time_dtype),
                        END: np.repeat(np.int64(end), n).view(self.windows.time_dtype), **batch, PANE: _string(pane, n)}))
                if self.assigner.kind == "count":
                    drop = np.flatnonzero(mine)
                    rows = rows.filter(~np.isin(np.arange(rows.num_rows), drop))
                    ts, key_values = self._ts(rows), column_numpy(rows[self.key])
        if self.assigner.kind == "count":
            self.rows = [rows] if rows.num_rows else []
        return out

    def snapshot(self) -> Any:
        return {"rows": Batch.concat(self.rows) if self.rows else None, "watermark": getattr(self.windows, "watermark",
                                                                                               MIN_TIME)}

    def restore(self, states: list[Any]) -> None:
        for saved in states:
            if saved is not None:
                mine = own_rows(self.ctx, self.key, saved["rows"])
                if mine is not None:
                    self.windows.add(mine, self._ts(mine), partial=False)
                    self.rows.append(mine)
        if hasattr(self.windows, "watermark"):
            self.windows.watermark = min((s["watermark"] for s in states if s is not None), default=MIN_TIME)
