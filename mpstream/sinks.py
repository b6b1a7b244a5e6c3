"""Sinks: operators that write their input out of the job.

* :class:`Collect`: batches go back to the caller of ``run()`` (the task sends them to the
  coordinator; exactly once, since the coordinator drops what a restore replays).
* :class:`FileSink`: one CSV (resumable: its file is cut back to its checkpointed length on
  restore, then appended to, as Flink's file sink does with in-progress files) or one npz file
  per instance (written at the end; not resumable, so refused in jobs with checkpoints).
* :class:`TransactionalFileSink`: exactly-once CSV output by two-phase commit.
* :class:`CallbackSink`: a function per batch, in the sink's process.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from .batch import Batch, StringColumn, null_mask, values_of
from .operators import Context, Operator, Output

__all__ = ["Collect", "FileSink", "TransactionalFileSink", "CallbackSink"]


def _append_csv(file: TextIO, batch: Batch) -> None:
    """Appends batch's rows to an open CSV file, after a header row if the file is empty."""
    writer = csv.writer(file)
    if file.tell() == 0:
        writer.writerow(list(batch))
    writer.writerows(zip(*(c.tolist() for c in batch.to_numpy().values())))


def _durable(file: TextIO) -> int:
    """Flushes and fsyncs file; returns its length."""
    file.flush()
    os.fsync(file.fileno())
    return file.tell()


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
        self._file: TextIO | None = None
        self._length = 0  # the file's length once closed

    def process(self, batch: Batch) -> Output:
        if self.fmt == "npz":
            self._kept.append(batch.copy())
            return None
        if self._file is None:  # a fresh run: the file starts empty
            self._file = open(self.path, "w", newline="")
        _append_csv(self._file, batch)
        return None

    def __repr__(self) -> str:
        return f"FileSink({self.directory!r}, fmt={self.fmt!r}: {'appended' if self.resumable else 'written whole at the end'})"

    def snapshot(self) -> Any:
        if self._file is None or self._file.closed:
            return {"length": self._length}
        return {"length": _durable(self._file)}

    def restore(self, states: list[Any]) -> None:
        length = states[0]["length"]
        if os.path.exists(self.path):
            os.truncate(self.path, length)  # rows after the checkpoint are replayed
        self._file = open(self.path, "a", newline="")

    def close(self) -> Output:
        if self._file is not None:
            self._length = _durable(self._file)
            self._file.close()
        elif self.fmt == "npz" and self._kept:
            batch = Batch.concat(self._kept)
            arrays = {}
            for name in batch:  # a nullable column: its values (0 or "" where null) and "{name}.null"
                column = batch[name]
                arrays[name] = values_of(column).to_numpy() if isinstance(column, StringColumn) else values_of(column)
                if null_mask(column) is not None:
                    arrays[f"{name}.null"] = null_mask(column)
            np.savez(self.path, **arrays)
        return None


class TransactionalFileSink(Operator):
    """Exactly-once CSV output by two-phase commit.

    Rows written after barrier e (epoch e; 0 before any) go to a pending file
    ``{directory}/.pending/{name}-{instance}.{e}.csv``. At barrier n the file is sealed
    (fsynced) and waits for checkpoint n: once the coordinator reports n committed, it is
    published by rename to ``{directory}/{name}-{instance}.{e:010d}.csv``. On restore, files
    the restored checkpoint sealed are published (idempotently) and every other pending file,
    written after it, is discarded: it will be written again. Nothing is published that a
    restore could replay: the rows after the last barrier of a bounded job are published by
    the job's final checkpoint. A job without checkpoints publishes everything at the end.
    """

    commits_on_checkpoint = True

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.pending_dir = os.path.join(self.directory, ".pending")
        os.makedirs(self.pending_dir, exist_ok=True)
        self.sealed: list[tuple[int, int]] = []  # (epoch, the checkpoint that sealed it)
        self.epoch = 0
        self._file: TextIO | None = None
        self._stale = True  # pending files of an earlier attempt are still there

    def _pending(self, epoch: int) -> str:
        return os.path.join(self.pending_dir, f"{self.ctx.name}-{self.ctx.instance}.{epoch}.csv")

    def _publish(self, epoch: int) -> None:
        final = os.path.join(self.directory, f"{self.ctx.name}-{self.ctx.instance}.{epoch:010d}.csv")
        if os.path.exists(self._pending(epoch)):
            os.rename(self._pending(epoch), final)

    def _discard_stale(self) -> None:
        """Removes this instance's pending files that no restored checkpoint sealed: they were
        written after the checkpoint restored (or in an attempt that committed none) and are
        replayed. Runs before the first write, after ``restore`` published what it must."""
        if self._stale:
            self._stale = False
            mine = f"{self.ctx.name}-{self.ctx.instance}."
            for entry in os.listdir(self.pending_dir):
                if entry.startswith(mine):
                    os.unlink(os.path.join(self.pending_dir, entry))

    def process(self, batch: Batch) -> Output:
        if self._file is None:
            self._discard_stale()
            self._file = open(self._pending(self.epoch), "w", newline="")
        _append_csv(self._file, batch)
        return None

    def _seal(self, checkpoint_id: int) -> None:
        if self._file is not None:
            _durable(self._file)
            self._file.close()
            self._file = None
            self.sealed.append((self.epoch, checkpoint_id))

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        self._discard_stale()
        self._seal(checkpoint_id)  # this epoch ends at the barrier
        self.epoch = checkpoint_id
        return None

    def snapshot(self) -> Any:
        return {"sealed": list(self.sealed), "epoch": self.epoch}

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        for epoch, sealed_by in [s for s in self.sealed if s[1] <= checkpoint_id]:
            self._publish(epoch)
            self.sealed.remove((epoch, sealed_by))

    def restore(self, states: list[Any]) -> None:
        state = states[0]
        for epoch, _ in state["sealed"]:  # sealed by the restored (so committed) checkpoint
            self._publish(epoch)
        self.epoch = state["epoch"]
        self._discard_stale()

    def close(self) -> Output:
        self._discard_stale()
        if self._file is not None:
            _durable(self._file)
        if not self.ctx.checkpointing:  # no checkpoint will commit: nothing can be replayed
            self._seal(0)
            self.notify_checkpoint_complete(0)
        return None
