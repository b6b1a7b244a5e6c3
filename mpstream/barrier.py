"""Barrier handling of a task with input channels, one handler per checkpointing mode.

A checkpoint barrier BARRIER(n) reaches a task once on every input channel. The task snapshots
its operators once BARRIER(n) came on every live channel (a channel that ended counts as done:
everything it carried came before its END_OF_STREAM).

* :class:`AlignedBarrierHandler` (exactly-once, Chandy-Lamport): a channel that delivered
  BARRIER(n) is not read again until every live channel has, so the snapshot reflects exactly
  the records before the barrier.
* :class:`AtLeastOnceBarrierHandler`: channels are never blocked; the snapshot may include
  records that followed the barrier on faster channels, so a restore may replay them twice.
"""

from __future__ import annotations

import time

from .channel import InputGate

__all__ = ["BarrierHandler", "AlignedBarrierHandler", "AtLeastOnceBarrierHandler"]


class BarrierHandler:
    """Tracks the barrier being aligned on a gate; :meth:`complete` says when to snapshot."""

    def __init__(self, gate: InputGate) -> None:
        self.gate = gate
        self.checkpoint_id: int | None = None  # the barrier being aligned, if any
        self.started = 0.0  # perf_counter() of its first arrival
        self._arrived: set[int] = set()

    def on_barrier(self, channel: int, checkpoint_id: int) -> None:
        if self.checkpoint_id is None:
            self.checkpoint_id, self.started = checkpoint_id, time.perf_counter()
        self._arrived.add(channel)

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

    def on_barrier(self, channel: int, checkpoint_id: int) -> None:
        super().on_barrier(channel, checkpoint_id)
        self.gate.block(channel)


class AtLeastOnceBarrierHandler(BarrierHandler):
    """At-least-once: notes the barrier, blocks nothing."""
