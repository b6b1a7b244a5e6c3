"""Sinks: operators that write their input out of the job.

* :class:`Collect`: batches go back to the caller of ``run()`` (the task sends them to the
  coordinator; exactly once, since the coordinator drops what a restore replays).
* :class:`FileSink`: one CSV (resumable: its file is cut back to its checkpointed length on
  restore, then appended to, as Flink's file sink does with in-progress files) or one npz file
  per instance (written at the end; not resumable, so refused in jobs with checkpoints).
* :class:`TransactionalFileSink`: exactly-once CSV, Parquet or Arrow IPC files by two-phase
  commit, rolled by size and by checkpoint, optionally in Hive-style partition directories.
* :class:`CallbackSink`: a function per batch, in the sink's process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import numpy as np

from .batch import Batch, column_numpy, null_mask, values_of
from .files import CsvWriter, FileWriter, new_writer
from .operators import Context, Operator, Output
from .partition import split

__all__ = ["Collect", "FileSink", "TransactionalFileSink", "CallbackSink", "SINK_FORMATS"]

SINK_FORMATS = {"csv": "csv", "parquet": "parquet", "arrow": "arrow"}  # format -> file extension
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # the directory of null partition values, as Hive names it


class Collect(Operator):
    """The identity: the task hands what a collect node emits to the coordinator."""


class CallbackSink(Operator):
    """Calls ``fn(batch)`` in the sink's worker process for every batch."""

    def __init__(self, fn: Callable[[Batch], None]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        self.fn(batch)
        return None


class FileSink(Operator):
    """Writes ``{directory}/{name}-{instance}.csv`` (rows appended per batch, a header first,
    even for an empty result; a null is an empty field) or ``.npz`` (columns, written at the
    end; a nullable column's null mask as ``{name}.null``). The CSV sink's
    snapshot is its file's length (fsynced): a restore truncates the file back to it, so each
    row is in the file once whatever restarts happened."""

    def __init__(self, directory: str, fmt: str = "csv") -> None:
        if fmt not in ("csv", "npz"):
            raise ValueError(f"file sink format must be 'csv' or 'npz', got {fmt!r}")
        self.directory, self.fmt = directory, fmt
        self.resumable = fmt == "csv"

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, f"{ctx.name}-{ctx.instance}.{self.fmt}")
        self._kept: list[Batch] = []
        self._writer: CsvWriter | None = None
        self._length = 0  # the file's length once closed

    def process(self, batch: Batch) -> Output:
        if self.fmt == "npz":
            self._kept.append(batch.copy())
            return None
        if self._writer is None:  # a fresh run: the file starts empty
            self._writer = CsvWriter(self.path)
        self._writer.write(batch)
        return None

    def __repr__(self) -> str:
        return f"FileSink({self.directory!r}, fmt={self.fmt!r}: {'appended' if self.resumable else 'written whole at the end'})"

    def snapshot(self) -> Any:
        if self._writer is None or self._writer.file.closed:
            return {"length": self._length}
        return {"length": self._writer.durable()}

    def restore(self, states: list[Any]) -> None:
        length = states[0]["length"]
        if os.path.exists(self.path):
            os.truncate(self.path, length)  # rows after the checkpoint are replayed
        self._writer = CsvWriter(self.path, open(self.path, "a", newline=""))

    def close(self) -> Output:
        if self._writer is not None:
            self._length = self._writer.durable()
            self._writer.close()
        elif self.fmt == "npz" and self._kept:
            batch = Batch.concat(self._kept)
            arrays = {}
            for name in batch:  # a nullable column: its values (0 or "" where null) and "{name}.null"
                column = batch[name]
                arrays[name] = column_numpy(values_of(column))
                if null_mask(column) is not None:
                    arrays[f"{name}.null"] = null_mask(column)
            np.savez(self.path, **arrays)
        return None


class TransactionalFileSink(Operator):
    """Exactly-once files by two-phase commit: CSV, Parquet or Arrow IPC (``fmt``).

    Rows written after barrier e (epoch e; 0 before any) go to pending files under
    ``{directory}/.pending/``; a file rolls over to the next part when its rows held
    ``max_bytes`` in memory. At barrier n the epoch's files are closed, made durable (fsync)
    and wait for checkpoint n: once the coordinator reports n committed they are published by
    rename to ``{directory}/[{column}={value}/]{name}-{instance}.{e:010d}.{part:04d}.{ext}``.
    With ``partition_by``, rows go to Hive-style directories by that column's value (the
    column itself is in the path, not in the files; a null is ``__HIVE_DEFAULT_PARTITION__``).
    On restore, files the restored checkpoint sealed are published (idempotently) and every
    other pending file of the instance, written after it, is discarded: it will be written
    again. Nothing is published that a restore could replay: the rows after the last barrier
    of a bounded job are published by the job's final checkpoint. A job without checkpoints
    publishes everything at the end.
    """

    commits_on_checkpoint = True

    def __init__(self, directory: str, fmt: str = "csv", max_bytes: int | None = None,
                 partition_by: str | None = None) -> None:
        if fmt not in SINK_FORMATS:
            raise ValueError(f"transactional file format must be one of {sorted(SINK_FORMATS)}, got {fmt!r}")
        self.directory, self.fmt, self.max_bytes, self.partition_by = directory, fmt, max_bytes, partition_by

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.pending_dir = os.path.join(self.directory, ".pending")
        os.makedirs(self.pending_dir, exist_ok=True)
        self.sealed: list[tuple[int, int, list[str]]] = []  # (epoch, the checkpoint that sealed it, its files)
        self.epoch = 0
        self._writers: dict[str, FileWriter] = {}  # partition directory -> its open file
        self._parts: dict[str, int] = {}  # partition directory -> files of this epoch so far
        self._done: list[str] = []  # files of this epoch closed already (rolled, or at the end)
        self._stale = True  # pending files of an earlier attempt are still there

    def _pending(self, relative: str) -> str:
        return os.path.join(self.pending_dir, relative)

    def _publish(self, files: list[str]) -> None:
        for relative in files:
            if os.path.exists(self._pending(relative)):
                final = os.path.join(self.directory, relative)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(self._pending(relative), final)

    def _discard_stale(self) -> None:
        """Removes this instance's pending files that no restored checkpoint sealed: they were
        written after the checkpoint restored (or in an attempt that committed none) and are
        replayed. Runs before the first write, after ``restore`` published what it must."""
        if self._stale:
            self._stale = False
            mine = f"{self.ctx.name}-{self.ctx.instance}."
            for root, _, names in os.walk(self.pending_dir):
                for entry in names:
                    if entry.startswith(mine):
                        os.unlink(os.path.join(root, entry))

    def _writer(self, partition: str) -> FileWriter:
        writer = self._writers.get(partition)
        if writer is None:
            part = self._parts.get(partition, 0)
            self._parts[partition] = part + 1
            name = f"{self.ctx.name}-{self.ctx.instance}.{self.epoch:010d}.{part:04d}.{SINK_FORMATS[self.fmt]}"
            relative = os.path.join(partition, name)
            os.makedirs(os.path.dirname(self._pending(relative)), exist_ok=True)
            writer = self._writers[partition] = new_writer(self.fmt, self._pending(relative))
        return writer

    def _finish(self, partition: str) -> None:
        """Closes a partition's open file (durable) into this epoch's done files."""
        writer = self._writers.pop(partition)
        writer.close()
        self._done.append(os.path.relpath(writer.path, self.pending_dir))

    def process(self, batch: Batch) -> Output:
        self._discard_stale()
        for partition, rows in self._partitions(batch):
            writer = self._writer(partition)
            writer.write(rows)
            if self.max_bytes is not None and writer.size >= self.max_bytes:
                self._finish(partition)
        return None

    def _partitions(self, batch: Batch) -> list[tuple[str, Batch]]:
        """(directory, rows) per value of the partition column (one group "" without one)."""
        if self.partition_by is None:
            return [("", batch)]
        column = batch[self.partition_by]
        nulls = null_mask(column)
        values = column_numpy(values_of(column))
        unique, inverse = np.unique(values, return_inverse=True)  # the values of null rows too: unused
        names = [quote(key, safe="") for key in unique.astype(str).tolist()]
        if nulls is not None and nulls.any():
            inverse = np.where(nulls, len(names), inverse)
            names.append(HIVE_NULL)
        rest = Batch({name: batch[name] for name in batch if name != self.partition_by})
        parts = split(rest, inverse, len(names))  # one counting sort, not a pass per value
        return [(f"{self.partition_by}={name}", part) for name, part in zip(names, parts) if part is not None]

    def _seal(self, checkpoint_id: int) -> None:
        for partition in list(self._writers):
            self._finish(partition)
        if self._done:
            self.sealed.append((self.epoch, checkpoint_id, self._done))
        self._done, self._parts = [], {}

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        self._discard_stale()
        self._seal(checkpoint_id)  # this epoch ends at the barrier
        self.epoch = checkpoint_id
        return None

    def snapshot(self) -> Any:
        return {"sealed": [(e, c, list(f)) for e, c, f in self.sealed], "epoch": self.epoch}

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        for entry in [s for s in self.sealed if s[1] <= checkpoint_id]:
            self._publish(entry[2])
            self.sealed.remove(entry)

    def restore(self, states: list[Any]) -> None:
        state = states[0]
        for _, _, files in state["sealed"]:  # sealed by the restored (so committed) checkpoint
            self._publish(files)
        self.epoch = state["epoch"]
        self._discard_stale()

    def close(self) -> Output:
        self._discard_stale()
        for partition in list(self._writers):  # no more rows: close the files; a barrier seals them
            self._finish(partition)
        if not self.ctx.checkpointing:  # no checkpoint will commit: nothing can be replayed
            self._seal(0)
            self.notify_checkpoint_complete(0)
        return None


