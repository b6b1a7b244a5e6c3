"""The messages a task and the coordinator exchange over the task's control pipe.

Each is a small frozen dataclass, pickled by ``multiprocessing.connection``. A task's pipe
identifies the task, so messages carry no task id.

Task -> coordinator: :class:`TaskReady`, :class:`Collected`,
:class:`AcknowledgeCheckpoint`, :class:`DeclineCheckpoint`, :class:`TaskDrained`,
:class:`TaskFinished`, :class:`TaskFailed`.

Coordinator -> task: :class:`TriggerCheckpoint`, :class:`CheckpointCommitted`,
:class:`EndInput`, :class:`Finish`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .batch import Batch
from .checkpoint import StateFile
from .metrics import InstanceStats

__all__ = [
    "TaskReady", "Collected", "AcknowledgeCheckpoint", "DeclineCheckpoint", "TaskDrained",
    "TaskFinished", "TaskFailed", "TriggerCheckpoint", "CheckpointCommitted", "EndInput", "Finish",
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
    """A collect sink's batch, produced after barrier ``epoch`` (0: before any)."""

    sink: str
    batch: Batch
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
