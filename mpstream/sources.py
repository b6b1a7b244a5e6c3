"""Sources: operators without input, possibly unbounded, possibly idle.

The contract is non-blocking, as Bytewax's ``next_batch``/``next_awake`` or Flink's split
readers: :meth:`Source.poll` returns what the source has *now* (a batch, or None when nothing is
ready) and raises ``StopIteration`` at the end of a bounded input; after a None,
:meth:`Source.next_awake` says when to ask again. Between polls the task handles checkpoint
triggers, timers and stops, so a source never blocks them. A source keeps its reading
position in its own ``snapshot()`` (any picklable value: a file offset, a log sequence id)
and gets it back in ``restore([position])``: replaying from there must give the same records.

:class:`OffsetSource` is the easy case: batch number ``offset`` of this instance, by
``read(offset)``; the position is the offset. The in-memory batches and generator sources are
OffsetSources. The in-memory columns, numpy and file (:mod:`mpstream.files`) sources share
:class:`Units` among their instances instead (:class:`UnitSource`): each takes the next unit nobody took when it
finished its last, so a slower instance (or one that started later) reads fewer and all end
together. They keep the units they read and the unit in hand with its rows, and restore from
the positions of all their instances (``restores_all``), at any parallelism.

>>> import time
>>> class Ticks(Source):
...     '''One row per poll, at most one every 10 ms; unbounded.'''
...     def open(self, ctx):
...         super().open(ctx)
...         self.next, self.due = 0, 0.0
...     def poll(self):
...         if time.time() < self.due:
...             return None                      # nothing now: asked again at next_awake()
...         self.due = time.time() + 0.01
...         self.next += 1
...         return {"tick": np.array([self.next - 1])}
...     def next_awake(self):
...         return self.due
...     def snapshot(self):
...         return self.next                     # the position
...     def restore(self, states):
...         self.next = states[0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .batch import Batch, StringColumn
from .errors import SourceError
from .operators import Context, Operator, Output

__all__ = ["Source", "OffsetSource", "Units", "UnitSource", "ColumnsSource", "BatchesSource", "GeneratorSource", "load_numpy"]


class Source(Operator):
    """An operator without input (see the module doc). Override :meth:`poll`, and
    :meth:`next_awake` for a source that can have nothing to give for a while."""

    def poll(self) -> Output:
        """The records available now (a batch or a mapping of columns), None when nothing is
        ready; raises StopIteration at the end of the input."""
        raise NotImplementedError

    def next_awake(self) -> float | None:
        """After :meth:`poll` returned None: the ``time.time()`` at which to poll again. None
        lets the task choose (it backs off from 1 ms to 50 ms while nothing comes)."""
        return None

    def total_rows(self) -> int | None:
        """The rows all instances of this source produce together, if it knows them before it
        starts (``run(progress=True)`` then shows a total); None (the default) when not."""
        return None

    def has_input(self) -> bool:
        """False when this instance has nothing to read at all (no partition assigned to it):
        with event time it is then idle from the start, holding no watermark back."""
        return True


class OffsetSource(Source):
    """A source read by batch number: ``read(offset)`` returns batch number offset of this
    instance (a Batch or a mapping of columns), or None at the end. Reading an offset again
    gives the same batch, which makes it replayable; its position is ``{"offset": n}``.
    Subclasses that keep more state extend ``snapshot``/``restore`` and call ``super()``."""

    offset = 0

    def read(self, offset: int) -> Output:
        raise NotImplementedError

    def poll(self) -> Output:
        out = self.read(self.offset)
        if out is None:
            raise StopIteration
        self.offset += 1
        return out

    def snapshot(self) -> Any:
        return {"offset": self.offset}

    def restore(self, states: list[Any]) -> None:
        self.offset = states[0]["offset"]


class Units:
    """The units of a source (pieces it reads whole: a file's row group or byte range, a run
    of rows), shared by its instances as Flink's split enumerator shares splits, on a counter:
    ``take()`` gives an instance the next unit nobody took (:attr:`Context.claim
    <mpstream.operators.Context.claim>`, a counter the coordinator maps for every attempt), so a
    slower instance reads fewer and all end together; every unit is read once.

    The position of an instance is the units it read to the end (``done``), the unit in hand
    with the rows read of it, and the units it goes on with first after a restore
    (``queue``). :meth:`restore` gets the positions of every instance: at the same parallelism
    an instance goes on with its own unit in hand and queue; at another, the units in hand and
    queued of all are dealt out anew (i, i + p, ...). The units nobody had taken are shared
    again, in order, so a replay reads the same records."""

    def __init__(self, count: int, ctx: Context, plan: Any) -> None:
        self.ctx, self.plan = ctx, plan  # plan: what the units are cut from (a restore checks it)
        self.pool = list(range(count))  # to take with ctx.claim(), in order
        self.queue: list[tuple[int, int]] = []  # (unit, rows read) to go on with first
        self.done: set[int] = set()  # read to their end
        self.unit: int | None = None  # in hand
        self.rows = 0  # read of it

    def any(self) -> bool:
        """Whether this instance may get a unit at all (for an idle start)."""
        return bool(self.queue or self.pool)

    def take(self) -> bool:
        """Takes the next unit: this instance's own (after a restore) first, then the next of
        the pool that no other instance took. False when none is left."""
        if self.queue:
            self.unit, self.rows = self.queue.pop(0)
            return True
        index = self.ctx.claim()
        if index >= len(self.pool):
            return False
        self.unit, self.rows = self.pool[index], 0
        return True

    def finish(self) -> None:
        """The unit in hand was read to its end."""
        self.done.add(self.unit)
        self.unit, self.rows = None, 0

    def snapshot(self) -> dict[str, Any]:
        return {"plan": self.plan, "done": sorted(self.done), "unit": self.unit, "rows": self.rows,
                "queue": list(self.queue)}

    def restore(self, states: list[dict[str, Any]], changed: Callable[[dict[str, Any]], str]) -> None:
        """Takes the positions of every instance; a position of another plan raises
        SourceError(changed(position)): its units are not these."""
        for state in states:
            if state.get("plan") != self.plan:
                raise SourceError(changed(state))

        def in_hand(state: dict[str, Any]) -> list[tuple[int, int]]:  # (unit, rows read), in reading order
            return ([(state["unit"], state["rows"])] if state["unit"] is not None else []) + state["queue"]

        held = [entry for state in states for entry in in_hand(state)]
        if self.ctx.rescaled:
            self.queue = sorted(held)[self.ctx.instance :: self.ctx.parallelism]
        else:
            self.queue = in_hand(states[self.ctx.instance])
        self.done = {unit for state in states for unit in state["done"]}
        taken = self.done | {unit for unit, _ in held}
        self.pool = [unit for unit in self.pool if unit not in taken]
        self.unit, self.rows = None, 0


class UnitSource(Source):
    """A source whose instances share :class:`Units`. A subclass makes ``self.units`` in
    ``open``, reads the unit in hand (:meth:`next_of_unit`: its next batch from ``units.rows``
    rows in, None at its end) and makes a batch without rows (:meth:`empty`): an instance that
    reads no row at all still sends the schema."""

    rescalable = True  # its instances share the units: any parallelism takes them over
    restores_all = True
    units: Units

    def next_of_unit(self) -> Batch | None:
        raise NotImplementedError

    def empty(self) -> Batch:
        raise NotImplementedError

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self._schema_sent = False

    def has_input(self) -> bool:
        return self.units.any()

    def poll(self) -> Batch:
        units = self.units
        while units.unit is not None or units.take():
            batch = self.next_of_unit()
            if batch is not None:
                units.rows += batch.num_rows
                self._schema_sent = True
                return batch
            units.finish()
        if not self._schema_sent:  # no row at all: the schema still reaches the job
            self._schema_sent = True
            return self.empty()
        raise StopIteration

    def snapshot(self) -> Any:
        return self.units.snapshot()


#: At most this many units of in-memory columns (each a run of whole batches): positions stay small.
MAX_UNITS = 1024


class ColumnsSource(UnitSource):
    """In-memory columns (or columns loaded by ``load`` in the worker), cut into batches of
    ``batch_size`` rows. The instances share the rows as :class:`Units` of whole batches (a
    batch each, or more for over MAX_UNITS batches)."""

    def __init__(self, columns: Mapping[str, Any] | None, batch_size: int,
                 load: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self._columns, self._load, self.batch_size = columns, load, batch_size

    def total_rows(self) -> int | None:
        return None if self._columns is None else len(next(iter(self._columns.values()), ()))

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        columns = self._columns if self._load is None else self._load()
        # A Batch (from_arrays: validated and encoded once, in the caller) is sliced as it is, from
        # read-only views (its numeric slices then go to a chained operator as they are);
        # loaded columns become a batch a slice at a time, so each instance converts only what
        # it reads (a structured .npy's fields are strided, str columns get encoded).
        self._data = columns.read_only() if isinstance(columns, Batch) else {
            name: col if isinstance(col, (np.ndarray, StringColumn)) else np.asarray(col) for name, col in columns.items()}
        self._rows = len(next(iter(self._data.values()), ()))
        batches = -(-self._rows // self.batch_size)
        self._unit_rows = self.batch_size * max(1, -(-batches // MAX_UNITS))
        self.units = Units(-(-self._rows // self._unit_rows), ctx, [self._rows, self._unit_rows])

    def _slice(self, start: int, stop: int) -> Batch:
        data = self._data
        if isinstance(data, Batch):
            return data.slice(start, stop)
        return Batch({name: col.slice(start, stop) if isinstance(col, StringColumn) else col[start:stop]  # masks kept
                      for name, col in data.items()})

    def next_of_unit(self) -> Batch | None:
        units = self.units
        start = units.unit * self._unit_rows + units.rows
        stop = min(start + self.batch_size, (units.unit + 1) * self._unit_rows, self._rows)
        return self._slice(start, stop) if start < stop else None

    def empty(self) -> Batch:
        return self._slice(0, 0)

    def restore(self, states: list[Any]) -> None:
        self.units.restore(states, lambda state: (
            f"source {self.ctx.name!r}: its columns are not the ones of the checkpoint ({state.get('plan', ['?'])[0]} "
            f"rows then, {self._rows} now, or another batch size); resume with the same data, or start "
            f"without resume"))


class BatchesSource(OffsetSource):
    """In-memory batches: instance i of p reads batches i, i + p, i + 2p, ..."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches

    def total_rows(self) -> int | None:
        return sum(b.num_rows for b in self.batches)

    def read(self, offset: int) -> Batch | None:
        index = self.ctx.instance + offset * self.ctx.parallelism
        return self.batches[index] if index < len(self.batches) else None


class GeneratorSource(OffsetSource):
    """``fn(instance, offset)`` returns batch number offset of an instance, or None at the end."""

    def __init__(self, fn: Callable[[int, int], Batch | Mapping[str, Any] | None]) -> None:
        self.fn = fn

    def read(self, offset: int) -> Batch | Mapping[str, Any] | None:
        out = self.fn(self.ctx.instance, offset)
        if out is not None and not isinstance(out, (Batch, Mapping)):
            raise SourceError(f"source {self.ctx.name!r}: its function returned {type(out).__name__} for offset "
                              f"{offset}; return a Batch, a mapping of columns (name -> array), or None at the end")
        return out


# ---- files --------------------------------------------------------------------------------

def load_numpy(path: str) -> dict[str, np.ndarray]:
    """Columns of an .npz archive (one array per column; ``{name}.null``, as the npz sink
    writes it, masks column name's nulls) or a structured .npy array."""
    if path.endswith(".npz"):
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
        return {name: np.ma.MaskedArray(a, mask=arrays[f"{name}.null"]) if f"{name}.null" in arrays else a
                for name, a in arrays.items() if not (name.endswith(".null") and name[:-5] in arrays)}
    arr = np.load(path, mmap_mode="r")
    if arr.dtype.names is None:
        raise SourceError(f"{path}: a .npy source must hold a structured array (one field per column)")
    return {name: np.asarray(arr[name]) for name in arr.dtype.names}
