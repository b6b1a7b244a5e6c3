"""The checkpoint coordinator: when to take a checkpoint, whom to ask, when it is complete.

Checkpoint n starts when the coordinator sends :class:`TriggerCheckpoint` to every source task
still running (each injects BARRIER(n) after its current batch; the barrier then flows with
the data) and to every task that has already *drained* (processed the end of its input and
ended its outputs: it snapshots its final state at once, no barrier needed). A task that
drains while n is pending, without having acknowledged it, is asked directly too. That is how
checkpoints go on after some tasks have finished (Flink's FLIP-147): a channel that ended
counts as aligned, since everything it carried came before its end.

n is committed (atomically, by the store) once every task of the job acknowledged it, and
every task is then told (:class:`CheckpointCommitted`). Any decline discards it, and so does
``timeout`` (as Flink's checkpoint timeout): a checkpoint not complete that many seconds after
its trigger is discarded and the next one is due an interval later (acknowledgements that come
after are ignored; a task still aligning its barriers finishes and goes on). More than
``tolerable_failures`` failures (declined or timed out) in a row fail the job.

An **unaligned** checkpoint (:mod:`mpstream.barrier`) is sent to every task at once: each
snapshots at its next record boundary, with no barrier to wait for behind full rings. With an
``aligned_timeout`` (Flink's aligned-checkpoint-timeout) it starts aligned instead, and turns
unaligned once it has taken that long: every task that has not acknowledged it is triggered
again, unaligned (one that has snapshotted it already ignores that). Stop checkpoints are
always aligned (a stopped job can be resumed at another parallelism).

A bounded job ends with a **final checkpoint**: once every task has drained, one more
checkpoint is taken, and tasks exit only after it is committed, so two-phase-commit sinks
publish their last epoch only when nothing can replay it. A **stop** is a checkpoint whose
trigger tells the sources to produce nothing after their barrier; the job ends once it is
committed, without processing the end of the input.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import CheckpointStore, StateFile
from .errors import CheckpointError
from .messages import AcknowledgeCheckpoint, CheckpointCommitted, DeclineCheckpoint, TriggerCheckpoint

__all__ = ["CheckpointCoordinator", "PendingCheckpoint"]


@dataclass
class PendingCheckpoint:
    """A checkpoint in flight: who has acknowledged, with what, and what kind it is."""

    checkpoint_id: int
    started: float
    awaiting: set[str]  # tasks that have not acknowledged yet
    asked: set[str] = field(default_factory=set)  # tasks sent a trigger
    states: dict[str, StateFile] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)
    alignment_s: float = 0.0
    pause_s: float = 0.0
    stop: bool = False
    final: bool = False
    unaligned_since: float | None = None  # when triggered unaligned, or turned so after the aligned timeout

    @property
    def unaligned(self) -> bool:
        return self.unaligned_since is not None

    def stats(self) -> dict[str, Any]:
        return {"id": self.checkpoint_id, "duration_s": round(time.monotonic() - self.started, 6),
                "alignment_s": round(self.alignment_s, 6), "snapshot_s": round(self.pause_s, 6),
                "bytes": sum(f.bytes for f in self.states.values()),
                "in_flight_rows": sum(f.in_flight_rows for f in self.states.values()),
                "unaligned": self.unaligned,
                "unaligned_after_s": None if self.unaligned_since is None else round(self.unaligned_since - self.started, 6)}


class CheckpointCoordinator:
    """Checkpoints of one attempt of a job (see the module doc). ``send(task, message)``
    delivers a message to a task; ``sources`` and ``tasks`` name the attempt's tasks."""

    def __init__(self, store: CheckpointStore, interval: float, tolerable_failures: int,
                 send: Callable[[str, Any], None], sources: set[str], tasks: set[str],
                 needs_final_commit: Callable[[], bool], unaligned: bool = False,
                 timeout: float = float("inf"), aligned_timeout: float | None = None) -> None:
        self.store, self.interval, self.tolerable_failures = store, interval, tolerable_failures
        self.unaligned, self.timeout, self.aligned_timeout = unaligned, timeout, aligned_timeout
        self.send, self.sources, self.tasks = send, sources, tasks
        self.needs_final_commit = needs_final_commit  # a two-phase-commit sink waits for the final one
        self.next_id = (store.complete() or [0])[-1] + 1
        self.next_trigger = time.monotonic() + interval
        self.pending: PendingCheckpoint | None = None
        self.completed: list[dict[str, Any]] = []
        self.failures = 0
        self.drained: set[str] = set()
        self.stop_requested = False
        self.retry_at = 0.0  # when a failed stop or final checkpoint is tried again
        self.done = False  # the final or stop checkpoint is committed (or given up): the job may end
        self.final_checkpoint: int | None = None

    @property
    def deadline(self) -> float:
        """time.monotonic() by which :meth:`poll` has something to do: trigger the next
        checkpoint, or expire the one in flight or turn it unaligned (inf: nothing)."""
        pending = self.pending
        if pending is not None:
            return pending.started + (self.timeout if not self._may_turn_unaligned(pending)
                                      else min(self.timeout, self.aligned_timeout))
        if self.done:
            return float("inf")
        if self.stop_requested or self.drained == self.tasks:
            return self.retry_at  # at once; after a failed one, at the next interval
        return self.next_trigger

    def demand(self) -> None:
        """A checkpoint as soon as none is in flight (SIGUSR1, JobHandle.checkpoint())."""
        self.next_trigger = 0.0

    def request_stop(self) -> None:
        self.stop_requested = True

    def poll(self) -> None:
        """Triggers the checkpoint that is due, if any, or expires the one in flight."""
        if time.monotonic() < self.deadline:
            return
        pending = self.pending
        if pending is not None:
            if time.monotonic() >= pending.started + self.timeout:
                self._expire()
            else:  # aligned for aligned_timeout: unaligned from now on
                pending.unaligned_since = time.monotonic()
                for task in sorted(pending.awaiting):
                    self._ask(task, pending)
            return
        final = self.drained == self.tasks
        stop = self.stop_requested and not final
        pending = self.pending = PendingCheckpoint(self.next_id, time.monotonic(), set(self.tasks), stop=stop,
                                                   final=final)
        if self.unaligned and not stop and self.aligned_timeout is None:
            pending.unaligned_since = pending.started
        self.next_id += 1
        asked = self.tasks if pending.unaligned else (self.sources - self.drained) | self.drained
        for task in sorted(asked):
            self._ask(task, pending)

    def _may_turn_unaligned(self, pending: PendingCheckpoint) -> bool:
        return self.unaligned and self.aligned_timeout is not None and not pending.unaligned and not pending.stop

    def _ask(self, task: str, pending: PendingCheckpoint) -> None:
        pending.asked.add(task)
        self.send(task, TriggerCheckpoint(pending.checkpoint_id, stop=pending.stop and task not in self.drained,
                                          unaligned=pending.unaligned))

    def on_drained(self, task: str) -> None:
        self.drained.add(task)
        pending = self.pending
        if pending is not None and task in pending.awaiting and task not in pending.asked:
            self._ask(task, pending)  # its final state: everything it got preceded its input's end

    def on_acknowledge(self, task: str, ack: AcknowledgeCheckpoint) -> None:
        pending = self.pending
        if pending is None or ack.checkpoint_id != pending.checkpoint_id:
            return  # of a checkpoint already failed
        pending.awaiting.discard(task)
        pending.states.update(ack.states)
        pending.alignment_s = max(pending.alignment_s, ack.alignment_s)
        pending.pause_s = max(pending.pause_s, ack.pause_s)
        self._maybe_complete()

    def on_decline(self, task: str, decline: DeclineCheckpoint) -> None:
        pending = self.pending
        if pending is None or decline.checkpoint_id != pending.checkpoint_id:
            return
        pending.awaiting.discard(task)
        pending.declined.append(decline.reason)
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        pending = self.pending
        if pending.awaiting:
            return
        self.pending = None
        self.next_trigger = time.monotonic() + self.interval
        try:
            if pending.declined:
                raise CheckpointError("; ".join(pending.declined))
            stats = pending.stats()
            self.store.commit(pending.checkpoint_id, pending.states, stats)
        except CheckpointError as exc:
            self._failed(pending, exc)
            return
        self.failures = 0
        self.completed.append(stats)
        for task in sorted(self.tasks):
            self.send(task, CheckpointCommitted(pending.checkpoint_id))
        if pending.final or pending.stop:
            self.done, self.final_checkpoint = True, pending.checkpoint_id

    def _expire(self) -> None:
        pending, self.pending = self.pending, None
        self.next_trigger = time.monotonic() + self.interval
        waiting = sorted(pending.awaiting)
        why = ("a task was busy in one long operator call (a source in one long poll), or writing its state took "
               "that long: raise checkpoint_timeout") if pending.unaligned else (
               "a task was busy in one long operator call, or its barrier waited behind full rings (backpressure): "
               "raise checkpoint_timeout, or pass unaligned_checkpoints=True so barriers overtake the buffered "
               "records")
        self._failed(pending, CheckpointError(
            f"timed out after {self.timeout:g} s (checkpoint_timeout): {len(waiting)} of {len(self.tasks)} tasks had "
            f"not acknowledged it ({', '.join(waiting[:8])}{', ...' if len(waiting) > 8 else ''}). Likely {why}"))

    def _failed(self, pending: PendingCheckpoint, exc: CheckpointError) -> None:
        self.store.discard(pending.checkpoint_id)
        self.failures += 1
        self.retry_at = time.monotonic() + self.interval
        kind = "final checkpoint" if pending.final else "stop checkpoint" if pending.stop else "checkpoint"
        if self.failures > self.tolerable_failures:
            raise CheckpointError(f"{self.failures} checkpoint{'s' if self.failures > 1 else ''} failed in a row, "
                                  f"more than the {self.tolerable_failures} tolerated; the last, {kind} "
                                  f"{pending.checkpoint_id}: {exc}") from exc
        if pending.final and not self.needs_final_commit():
            warnings.warn(f"the final checkpoint {pending.checkpoint_id} failed and was discarded; the job ends "
                          f"without it (no sink waits for it): {exc}", stacklevel=2)
            self.done = True
            return
        warnings.warn(f"{kind} {pending.checkpoint_id} failed and was discarded; the job goes on: {exc}", stacklevel=2)

    def abandon(self) -> None:
        """The attempt is over (a failure): a checkpoint in flight will never complete."""
        if self.pending is not None:
            self.store.discard(self.pending.checkpoint_id)
            self.pending = None
