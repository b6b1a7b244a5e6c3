"""Sources: operators without input, possibly unbounded, possibly idle.

The contract is non-blocking, as Bytewax's ``next_batch``/``next_awake`` or Flink's split
readers: :meth:`Source.poll` returns what the source has *now* (a batch, or None when nothing is
ready) and raises ``StopIteration`` at the end of a bounded input; after a None,
:meth:`Source.next_awake` says when to ask again. Between polls the task handles checkpoint
triggers, timers and stops, so a source never blocks them. A source keeps its reading
position in its own ``snapshot()`` (any picklable value: a file offset, a log sequence id)
and gets it back in ``restore([position])``: replaying from there must give the same records.

:class:`OffsetSource` is the easy case: batch number ``offset`` of this instance, by
``read(offset)``; the position is the offset. The built-in in-memory, generator and numpy
sources are OffsetSources; the file sources (:mod:`mpstream.files`) keep the units they read
and the unit in hand with its rows, and restore from the positions of all their instances
(``restores_all``).

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

__all__ = ["Source", "OffsetSource", "ColumnsSource", "BatchesSource", "GeneratorSource", "load_numpy"]


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


def _share(rows: int, ctx: Context) -> tuple[int, int]:
    """The contiguous rows [start, stop) of instance ctx.instance out of ctx.parallelism."""
    return rows * ctx.instance // ctx.parallelism, rows * (ctx.instance + 1) // ctx.parallelism


class ColumnsSource(OffsetSource):
    """In-memory columns (or columns loaded by ``load`` in the worker), cut into batches.
    Offset 0 is read even without rows, so the columns' schema reaches the job."""

    def __init__(self, columns: Mapping[str, Any] | None, batch_size: int,
                 load: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self._columns, self._load, self.batch_size = columns, load, batch_size

    def total_rows(self) -> int | None:
        return None if self._columns is None else len(next(iter(self._columns.values()), ()))

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        columns = self._columns if self._load is None else self._load()
        rows = len(next(iter(columns.values()), ()))
        start, stop = _share(rows, ctx)  # this instance's rows only: encode no more than those
        self._data = Batch({name: col.slice(start, stop) if isinstance(col, StringColumn) else
                            (col if isinstance(col, np.ndarray) else np.asarray(col))[start:stop]  # masks kept
                            for name, col in columns.items()})

    def read(self, offset: int) -> Batch | None:
        start = offset * self.batch_size
        if start >= self._data.num_rows and offset > 0:
            return None
        return self._data.slice(start, start + self.batch_size)


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
