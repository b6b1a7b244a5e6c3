"""Operators: the per-instance logic a worker process runs, as small lifecycle classes.

An :class:`Operator` is opened once per instance with its :class:`Context`, gets every input
batch through ``process`` and may return a batch (or a mapping of columns), several (any
iterable), or None; ``close``
may return final output at the end of its input. ``snapshot``/``restore`` carry its state for
checkpoints. A :class:`Source` produces batches by offset, so it can be replayed from one.

Batches passed to ``process`` hold views on shared memory, valid during the call: return
them (or slices of them) freely, they are copied downstream; ``copy()`` what you keep.

>>> class RunningTotal(Operator):
...     def open(self, ctx):
...         self.total = 0
...     def process(self, batch):
...         self.total += int(batch["x"].sum())
...     def close(self):
...         return Batch({"total": np.array([self.total])})
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .aggregate import KeyedAggregate
from .batch import Batch, StringColumn
from .partition import groups_of_instance, key_groups

__all__ = ["Context", "Operator", "KeyedOperator", "KeyedState", "Source", "Output"]

Output = Union[Batch, Mapping[str, Any], Iterable[Union[Batch, Mapping[str, Any]]], None]


@dataclass(frozen=True)
class Context:
    """Where an operator instance runs: its name, instance index and parallelism."""

    name: str
    instance: int
    parallelism: int


class Operator:
    """Lifecycle of one operator instance: open -> process* -> close; snapshot/restore for
    checkpoints (state must be picklable)."""

    def open(self, ctx: Context) -> None:
        self.ctx = ctx

    def process(self, batch: Batch) -> Output:
        return batch

    def close(self) -> Output:
        return None

    def snapshot(self) -> Any:
        return None

    def restore(self, state: Any) -> None:
        pass

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Called (when overridden) after checkpoint checkpoint_id was committed: the moment a
        two-phase-commit sink publishes what preceded it."""


class KeyedState:
    """Per-key values of one keyed operator instance, kept per key group, so a snapshot can be
    split by group and restored at another parallelism.

    >>> state = KeyedState(range(128))
    >>> state["a.com"] = 3
    >>> state.get("a.com", 0), state.get("b.org", 0), len(state)
    (3, 0, 1)
    """

    def __init__(self, groups: range) -> None:
        self.groups = groups
        self._by_group: dict[int, dict[Any, Any]] = {}

    def _group(self, key: Any) -> dict[Any, Any]:
        col = StringColumn.from_strings([key]) if isinstance(key, str) else np.array([key])
        return self._by_group.setdefault(int(key_groups(col)[0]), {})

    def get(self, key: Any, default: Any = None) -> Any:
        return self._group(key).get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self._group(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._group(key)[key] = value

    def __len__(self) -> int:
        return sum(len(values) for values in self._by_group.values())

    def items(self) -> Iterable[tuple[Any, Any]]:
        return ((k, v) for values in self._by_group.values() for k, v in values.items())

    def snapshot(self) -> dict[int, dict[Any, Any]]:
        """{key group: {key: value}} (a copy of the dictionaries, values shared)."""
        return {group: dict(values) for group, values in self._by_group.items() if values}

    def restore(self, snapshots: Iterable[dict[int, dict[Any, Any]]]) -> None:
        """Takes this instance's key groups out of snapshots of any number of instances."""
        for snapshot in snapshots:
            for group, values in snapshot.items():
                if group in self.groups:
                    self._by_group.setdefault(group, {}).update(values)


class KeyedOperator(Operator):
    """A stateful operator after ``key_by``: it sees every row of the keys in its key groups;
    ``self.state`` is their :class:`KeyedState`, snapshotted and restored per key group, so
    it restores at another parallelism too."""

    rescalable = True
    keyed_input = True

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.state = KeyedState(groups_of_instance(ctx.instance, ctx.parallelism))

    def snapshot(self) -> Any:
        return self.state.snapshot()

    def restore(self, states: list[Any]) -> None:
        self.state.restore(s for s in states if s)


class Source(Operator):
    """An operator without input: it produces batch number ``offset`` of this instance's share,
    or None at the end. Reading the same offset again gives the same batch: that is what makes
    a source replayable (the runtime records the offset in every checkpoint itself)."""

    def read(self, offset: int) -> Batch | None:
        raise NotImplementedError


# ---- sources ------------------------------------------------------------------------------

def _share(rows: int, ctx: Context) -> tuple[int, int]:
    """The contiguous rows [start, stop) of instance ctx.instance out of ctx.parallelism."""
    return rows * ctx.instance // ctx.parallelism, rows * (ctx.instance + 1) // ctx.parallelism


class ColumnsSource(Source):
    """In-memory columns (or columns loaded by ``load`` in the worker), cut into batches."""

    def __init__(self, columns: Mapping[str, Any] | None, batch_size: int,
                 load: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self._columns, self._load, self.batch_size = columns, load, batch_size

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        columns = self._columns if self._load is None else self._load()
        rows = len(next(iter(columns.values()), ()))
        start, stop = _share(rows, ctx)  # this instance's rows only: encode no more than those
        self._data = Batch({name: col.slice(start, stop) if isinstance(col, StringColumn) else np.asarray(col)[start:stop]
                            for name, col in columns.items()})

    def read(self, offset: int) -> Batch | None:
        start = offset * self.batch_size
        if start >= self._data.num_rows:
            return None
        return self._data.slice(start, start + self.batch_size)


class BatchesSource(Source):
    """In-memory batches: instance i of p reads batches i, i + p, i + 2p, ..."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches

    def read(self, offset: int) -> Batch | None:
        index = self.ctx.instance + offset * self.ctx.parallelism
        return self.batches[index] if index < len(self.batches) else None


class GeneratorSource(Source):
    """``fn(instance, offset)`` returns batch number offset of an instance, or None at the end."""

    def __init__(self, fn: Callable[[int, int], Batch | Mapping[str, Any] | None]) -> None:
        self.fn = fn

    def read(self, offset: int) -> Batch | None:
        out = self.fn(self.ctx.instance, offset)
        return out if out is None or isinstance(out, Batch) else Batch(out)


def load_csv(path: str) -> dict[str, np.ndarray]:
    """Columns of a CSV file with a header row; each column int, else float, else str."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty CSV file (a header row is required)")
    header, body = rows[0], rows[1:]
    out = {}
    for i, name in enumerate(header):
        values = [r[i] for r in body]
        for dtype in (np.int64, np.float64):
            try:
                out[name] = np.array(values, dtype=dtype)
                break
            except ValueError:
                continue
        else:
            out[name] = np.array(values, dtype=str)
    return out


def load_numpy(path: str) -> dict[str, np.ndarray]:
    """Columns of an .npz archive (one array per column) or a structured .npy array."""
    if path.endswith(".npz"):
        with np.load(path) as archive:
            return {name: archive[name] for name in archive.files}
    arr = np.load(path, mmap_mode="r")
    if arr.dtype.names is None:
        raise ValueError(f"{path}: a .npy source must hold a structured array (one field per column)")
    return {name: np.asarray(arr[name]) for name in arr.dtype.names}


# ---- transforms ---------------------------------------------------------------------------

class Map(Operator):
    def __init__(self, fn: Callable[[Batch], Batch | Mapping[str, Any]]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        out = self.fn(batch)
        return out if isinstance(out, Batch) or out is None else Batch(out)


class Filter(Operator):
    def __init__(self, fn: Callable[[Batch], np.ndarray]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        return batch.filter(self.fn(batch))


class FlatMap(Operator):
    def __init__(self, fn: Callable[[Batch], Iterable[Batch]]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        return self.fn(batch)


class Aggregate(Operator):
    """Keyed aggregation of ``inputs`` ("rows", or "partials" of other instances) into
    ``output`` ("results", or "partials" for a later stage). Emits when its input ends."""

    rescalable = True  # restore() takes old instances' states and keeps its key groups

    def __init__(self, key: str, spec: Mapping[str, str | Sequence[str]], inputs: str = "rows",
                 output: str = "results", keyed_input: bool = True) -> None:
        self.key, self.spec, self.inputs, self.output = key, spec, inputs, output
        self.keyed_input = keyed_input  # False behind a salted edge: any key may reach any instance

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.state = KeyedAggregate(self.key, self.spec)

    def process(self, batch: Batch) -> Output:
        (self.state.merge if self.inputs == "partials" else self.state.update)(batch)
        return None

    def snapshot(self) -> Any:
        return self.state.partial() if len(self.state) else None

    def restore(self, states: list[Any]) -> None:
        mine = groups_of_instance(self.ctx.instance, self.ctx.parallelism)
        for partial in states:
            if partial is not None:
                groups = key_groups(partial[self.key])
                self.state.merge(partial.filter((groups >= mine.start) & (groups < mine.stop)))

    def close(self) -> Output:
        if not len(self.state):
            return None
        return self.state.partial() if self.output == "partials" else self.state.result()


# ---- sinks --------------------------------------------------------------------------------

def _append_csv(file: Any, batch: Batch) -> None:
    """Appends batch's rows to an open CSV file, after a header row if the file is empty."""
    writer = csv.writer(file)
    if file.tell() == 0:
        writer.writerow(list(batch))
    writer.writerows(zip(*(c.tolist() for c in batch.to_numpy().values())))


class TransactionalFileSink(Operator):
    """Exactly-once CSV output by two-phase commit. Rows of epoch e (after BARRIER(e)) go to a
    pending file ``{directory}/.pending/{name}-{instance}.{e}.csv``; checkpoint n lists the
    files of epochs before n, and once it is committed they are published by rename to
    ``{directory}/{name}-{instance}.{e:010d}.csv``. On restore, listed files are published
    (idempotently) and every other pending file, written after the checkpoint, is discarded.
    At the end of the stream everything is published."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.pending_dir = os.path.join(self.directory, ".pending")
        os.makedirs(self.pending_dir, exist_ok=True)
        self.ready: list[int] = []  # closed epochs awaiting a committed checkpoint
        self.epoch = 0
        self._file = None

    def _pending(self, epoch: int) -> str:
        return os.path.join(self.pending_dir, f"{self.ctx.name}-{self.ctx.instance}.{epoch}.csv")

    def _publish(self, epoch: int) -> None:
        final = os.path.join(self.directory, f"{self.ctx.name}-{self.ctx.instance}.{epoch:010d}.csv")
        if os.path.exists(self._pending(epoch)):
            os.rename(self._pending(epoch), final)

    def process(self, batch: Batch) -> Output:
        if self._file is None:
            self._file = open(self._pending(self.epoch), "w", newline="")
        _append_csv(self._file, batch)
        return None

    def _seal(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.ready.append(self.epoch)

    def snapshot(self) -> Any:
        self._seal()  # this epoch ends at the barrier
        self.epoch += 1
        return {"ready": list(self.ready), "epoch": self.epoch}

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        for epoch in [e for e in self.ready if e < self.epoch]:
            self._publish(epoch)
            self.ready.remove(epoch)

    def restore(self, state: Any) -> None:
        if state is not None:
            for epoch in state["ready"]:
                self._publish(epoch)
            self.epoch = state["epoch"]
        mine = f"{self.ctx.name}-{self.ctx.instance}."
        for entry in os.listdir(self.pending_dir):  # written after the checkpoint: replayed
            if entry.startswith(mine):
                os.unlink(os.path.join(self.pending_dir, entry))

    def close(self) -> Output:
        self._seal()
        for epoch in self.ready:
            self._publish(epoch)
        self.ready = []
        return None


class CallbackSink(Operator):
    """Calls ``fn(batch)`` in the sink's worker process for every batch."""

    def __init__(self, fn: Callable[[Batch], None]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        self.fn(batch)
        return None


class FileSink(Operator):
    """Writes ``{directory}/{name}-{instance}.csv`` (rows appended per batch) or ``.npz``
    (columns, written at close) per instance."""

    def __init__(self, directory: str, fmt: str = "csv") -> None:
        if fmt not in ("csv", "npz"):
            raise ValueError(f"file sink format must be 'csv' or 'npz', got {fmt!r}")
        self.directory, self.fmt = directory, fmt

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, f"{ctx.name}-{ctx.instance}.{self.fmt}")
        self._kept: list[Batch] = []
        self._file = open(self.path, "w", newline="") if self.fmt == "csv" else None

    def process(self, batch: Batch) -> Output:
        if self._file is None:
            self._kept.append(batch.copy())
        else:
            _append_csv(self._file, batch)
        return None

    def close(self) -> Output:
        if self._file is not None:
            self._file.close()
        else:
            np.savez(self.path, **Batch.concat(self._kept).to_numpy())
        return None
