"""The messages a task and the coordinator exchange over the task's control pipe.

Each is a small frozen dataclass, pickled by ``multiprocessing.connection``. A task's pipe
identifies the task, so messages carry no task id. A message with large buffers (a collect
sink's batches) goes out of band (:func:`send_out_of_band`): a :class:`Frames` message, then
the message pickled without its buffers (protocol 5), then each buffer straight from its
memory; :func:`receive` reads each buffer straight into memory of its own (slices of large
chunks: :class:`BufferArena`) and puts the message back together. That saves pickling a copy
of every batch and assembling it again on the other side.

Task -> coordinator: :class:`TaskReady`, :class:`Collected`,
:class:`AcknowledgeCheckpoint`, :class:`DeclineCheckpoint`, :class:`TaskDrained`,
:class:`TaskFinished`, :class:`TaskFailed`.

Coordinator -> task: :class:`TriggerCheckpoint`, :class:`CheckpointCommitted`,
:class:`EndInput`, :class:`Finish`.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .batch import Batch
from .checkpoint import StateFile
from .metrics import InstanceStats

__all__ = [
    "TaskReady", "Collected", "AcknowledgeCheckpoint", "DeclineCheckpoint", "TaskDrained",
    "TaskFinished", "TaskFailed", "TriggerCheckpoint", "CheckpointCommitted", "EndInput", "Finish", "Frames",
    "send_out_of_band", "receive", "BufferArena",
]


# ---- task -> coordinator ---------------------------------------------------------------------

@dataclass(frozen=True)
class TaskReady:
    """Every channel is attached and every operator restored: the task starts processing.
    ``commits_on_checkpoint``: one of its operators publishes output when a checkpoint commits
    (a two-phase-commit sink), so the job must not end before its final checkpoint commits."""

    commits_on_checkpoint: bool = False


@dataclass(frozen=True)
class Collected:
    """A collect sink's batches, in order, produced after barrier ``epoch`` (0: before any)."""

    sink: str
    batches: tuple[Batch, ...]
    epoch: int


@dataclass(frozen=True)
class AcknowledgeCheckpoint:
    """The task's operators took their snapshots of checkpoint ``checkpoint_id`` and wrote them
    (``states``: state key -> file). ``alignment_s``: first barrier to aligned (unaligned: to
    the last channel's barrier found); ``pause_s``: the time the task stopped processing for
    the in-memory copy."""

    checkpoint_id: int
    states: dict[str, StateFile]
    alignment_s: float
    pause_s: float


@dataclass(frozen=True)
class DeclineCheckpoint:
    """The task could not take or write its snapshot (e.g. a full disk): the checkpoint fails,
    the job goes on."""

    checkpoint_id: int
    reason: str


@dataclass(frozen=True)
class TaskDrained:
    """The task processed the end of all its input, closed its operators and ended every
    output channel. With checkpoints it waits for the job's final checkpoint and a Finish."""


@dataclass(frozen=True)
class TaskFinished:
    """The task's statistics, one per operator it ran; its last message before it exits."""

    stats: tuple[InstanceStats, ...]


@dataclass(frozen=True)
class TaskFailed:
    """Operator ``operator`` instance ``instance`` raised ``error`` (``restoring``: while
    taking back its state from the checkpoint)."""

    operator: str
    instance: int
    error: str
    traceback: str
    restoring: bool = False


# ---- coordinator -> task ---------------------------------------------------------------------

@dataclass(frozen=True)
class TriggerCheckpoint:
    """To a source task: inject BARRIER(checkpoint_id) after the current batch; with ``stop``
    produce nothing after it (stop with a checkpoint). To a drained task: snapshot now.
    ``unaligned`` (sent to every task): snapshot at the next record boundary, without waiting
    for the barriers to come through the rings (:class:`~mpstream.barrier.InFlightCopy`)."""

    checkpoint_id: int
    stop: bool = False
    unaligned: bool = False


@dataclass(frozen=True)
class CheckpointCommitted:
    """Checkpoint ``checkpoint_id`` is complete: two-phase-commit sinks publish what preceded it."""

    checkpoint_id: int


@dataclass(frozen=True)
class EndInput:
    """To a source task: end the input here, as if the source had no more (a drain)."""


@dataclass(frozen=True)
class Finish:
    """Report statistics and exit. A task that was not drained exits without processing the
    end of its input (after a stop with a checkpoint: a resumed job goes on from there)."""


# ---- large messages: out of band -------------------------------------------------------------

@dataclass(frozen=True)
class Frames:
    """The next frame is a message pickled without its buffers; the ``sizes`` frames after it
    are those buffers (see the module doc)."""

    sizes: tuple[int, ...]


def send_out_of_band(conn: Connection, message: Any) -> None:
    """Sends message with its buffers (a batch's columns, even views on a ring) straight from
    their memory into the pipe. The caller holds the pipe for the whole call."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [buffer.raw() for buffer in buffers]
    conn.send(Frames(tuple(raw.nbytes for raw in raws)))
    conn.send_bytes(header)
    for raw in raws:  # unframed: the receiver knows the sizes
        while raw:
            raw = raw[os.write(conn.fileno(), raw):]


class BufferArena:
    """Memory for the buffers :func:`receive` reads: consecutive 64-byte-aligned slices of
    chunks of ``CHUNK`` bytes (a buffer as large gets one of its own). numpy asks the kernel to
    back arrays of 4 MiB and more with huge pages, so the memory a large result lands in
    costs a page fault per 2 MiB instead of one per 4 KiB, which made reading it take twice
    as long as copying it. A chunk stays allocated while any array on it lives; pages it never
    reached take no memory.

    >>> arena = BufferArena()
    >>> a, b = arena.take(10), arena.take(100)
    >>> b.ctypes.data - a.ctypes.data, a.ctypes.data % 64, a.base is b.base
    (64, 0, True)
    """

    CHUNK = 32 << 20

    def __init__(self) -> None:
        self._chunk = np.empty(0, np.uint8)
        self._used = 0

    def take(self, size: int) -> np.ndarray:
        """size bytes, not zeroed."""
        if size >= self.CHUNK:
            return np.empty(size, np.uint8)
        if self._used + size > len(self._chunk):
            raw = np.empty(self.CHUNK + 64, np.uint8)
            start = -raw.ctypes.data % 64
            self._chunk, self._used = raw[start : start + self.CHUNK], 0
        buffer = self._chunk[self._used : self._used + size]
        self._used += -(-size // 64) * 64
        return buffer


def receive(conn: Connection, arena: BufferArena) -> Any:
    """The next message (put back together when it came out of band: each buffer read from
    the pipe straight into memory from arena, which the message's arrays then use)."""
    message = conn.recv()
    if not isinstance(message, Frames):
        return message
    header = conn.recv_bytes()
    buffers = []
    for size in message.sizes:
        buffer = arena.take(size)  # not zeroed: the pipe fills it
        view = memoryview(buffer)
        while view:
            got = os.readv(conn.fileno(), [view])
            if not got:
                raise EOFError("the task's pipe closed in the middle of a message")
            view = view[got:]
        buffers.append(buffer)
    return pickle.loads(header, buffers=buffers)
