"""Barrier handling of a task with input channels, one handler per checkpointing mode.

A checkpoint barrier BARRIER(n) reaches a task once on every input channel. The task snapshots
its operators once BARRIER(n) came on every live channel (a channel that ended counts as done:
everything it carried came before its END_OF_STREAM).

* :class:`AlignedBarrierHandler` (exactly-once, Chandy-Lamport): a channel that delivered
  BARRIER(n) is not read again until every live channel has, so the snapshot reflects exactly
  the records before the barrier.
* :class:`AtLeastOnceBarrierHandler`: channels are never blocked; the snapshot may include
  records that followed the barrier on faster channels, so a restore may replay them twice.

Unaligned checkpoints (exactly-once, Flink's unaligned checkpoints) do not wait for barriers
to come through full rings. Every task snapshots at the first sign of checkpoint n (the
coordinator's trigger, sent to every task, or BARRIER(n) on any channel, whichever comes
first), forwards BARRIER(n) at once and reads on, never blocking a channel. The records a
channel carries between this task's snapshot and its upstream's BARRIER(n) were sent before
the upstream's snapshot and are processed after this one: they are the channel's *in-flight
data*, which :class:`InFlightCopy` copies out of the ring (looking ahead, without taking
them) into the checkpoint, and which a restore processes first (at another parallelism, each
row on the instance its input edge routes it to now: :meth:`mpstream.task.Task._in_flight`).
A task reaches its upstream's barrier only after its own snapshot (a barrier it reads starts
it), so nothing is counted twice.
The BARRIER record of an unaligned checkpoint carries ``n | UNALIGNED``.

With an aligned-checkpoint timeout (Flink's ``aligned-checkpoint-timeout``) a checkpoint starts
aligned and turns unaligned once it has taken that long: the coordinator then triggers every
task that has not acknowledged it, unaligned. A task in the middle of aligning n snapshots at
once (:meth:`BarrierHandler.abandon`): the channels that delivered BARRIER(n) have no in-flight
data (what follows their barrier comes after the snapshot, as it would aligned), the others
are copied up to their BARRIER(n). Barriers of a checkpoint the task has taken already are
ignored.
"""

from __future__ import annotations

import time
from typing import Any

from .channel import InputGate, LookAhead, RecordKind

__all__ = ["BarrierHandler", "AlignedBarrierHandler", "AtLeastOnceBarrierHandler", "InFlightCopy", "UNALIGNED"]

#: Set in the value of an unaligned checkpoint's BARRIER record (the checkpoint id is below it).
UNALIGNED = 1 << 63


class BarrierHandler:
    """Tracks the barrier being aligned on a gate; :meth:`complete` says when to snapshot."""

    def __init__(self, gate: InputGate) -> None:
        self.gate = gate
        self.checkpoint_id: int | None = None  # the barrier being aligned, if any
        self.started = 0.0  # perf_counter() of its first arrival
        self._arrived: set[int] = set()

    def on_barrier(self, channel: int, checkpoint_id: int) -> bool:
        """Notes BARRIER(checkpoint_id) from channel; False if it is ignored: a barrier of a
        checkpoint older than the one being aligned. A newer one starts aligning it instead:
        the older one timed out (at-least-once, channels are not blocked, so a fast channel's
        next barrier can come before a slow channel's last)."""
        if self.checkpoint_id is not None and checkpoint_id != self.checkpoint_id:
            if checkpoint_id < self.checkpoint_id:
                return False
            self.abandon(self.checkpoint_id)
        if self.checkpoint_id is None:
            self.checkpoint_id, self.started = checkpoint_id, time.perf_counter()
        self._arrived.add(channel)
        return True

    def abandon(self, checkpoint_id: int) -> set[int]:
        """Stops aligning (the task snapshots checkpoint_id unaligned now): the channels that
        delivered BARRIER(checkpoint_id), which are unblocked, as is any other channel."""
        passed = self._arrived if self.checkpoint_id == checkpoint_id else set()
        self.checkpoint_id, self._arrived = None, set()
        self.gate.unblock_all()
        return passed

    def complete(self) -> int | None:
        """The checkpoint id to snapshot now (every live channel delivered its barrier or
        ended), resetting the handler; else None."""
        if self.checkpoint_id is None or not set(self.gate.live) <= self._arrived:
            return None
        checkpoint_id, self.checkpoint_id = self.checkpoint_id, None
        self._arrived.clear()
        self.gate.unblock_all()
        return checkpoint_id


class AlignedBarrierHandler(BarrierHandler):
    """Exactly-once: blocks every channel that delivered the barrier until alignment."""

    def on_barrier(self, channel: int, checkpoint_id: int) -> bool:
        if not super().on_barrier(channel, checkpoint_id):
            return False
        self.gate.block(channel)
        return True


class AtLeastOnceBarrierHandler(BarrierHandler):
    """At-least-once: notes the barrier, blocks nothing."""


class InFlightCopy:
    """The in-flight data of an unaligned checkpoint a task has snapshotted (see the module
    doc): per live channel, the records up to that channel's BARRIER(n) or END_OF_STREAM,
    copied as they are found ahead of the reader; ``passed``: channels that delivered their
    BARRIER(n) already (nothing of theirs is in flight). ``snapshots`` wait here, in memory,
    until :meth:`scan` finds the last channel's barrier."""

    def __init__(self, checkpoint_id: int, gate: InputGate, snapshots: dict[str, Any], pause_s: float,
                 passed: set[int] = frozenset()) -> None:
        self.checkpoint_id, self.snapshots, self.pause_s = checkpoint_id, snapshots, pause_s
        self.started = time.perf_counter()
        copied = [channel for channel in gate.live if channel not in passed]
        self.records: dict[int, list[tuple[int, Any]]] = {channel: [] for channel in copied}
        self._ahead = {channel: LookAhead(gate.readers[channel]) for channel in copied}

    def before_taking(self, channel: int) -> None:
        """The task is about to process the record it holds from channel: copy it (and what
        follows) first, unless that channel's barrier was found already."""
        ahead = self._ahead.get(channel)
        if ahead is not None:
            self._scan(channel, ahead)

    def scan(self) -> bool:
        """Copies what every channel got since the last scan; True once every channel's
        barrier (or end) was found: the copy is complete."""
        for channel, ahead in list(self._ahead.items()):
            self._scan(channel, ahead)
        return not self._ahead

    def _scan(self, channel: int, ahead: LookAhead) -> None:
        while (found := ahead.next()) is not None:
            kind, value = found
            if kind is RecordKind.END_OF_STREAM or (kind is RecordKind.BARRIER and
                                                   value & ~UNALIGNED >= self.checkpoint_id):
                del self._ahead[channel]
                return
            if kind is not RecordKind.BARRIER:  # an older barrier carries nothing to replay
                self.records[channel].append((int(kind), value))
