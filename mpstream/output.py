"""The output side of an operator instance: one :class:`OutputWriter` per output edge.

It picks the target channel of every row (a partitioner, or the one channel of a forward
edge), splits the batch once (a stable counting sort), and writes each part: blocking while
the channel has no credit, or, under the drop policy, shedding the part and counting its
rows. A part larger than the ring takes (about half of it) is written in halves, in order.
A batch without rows is written only to channels that have carried nothing yet: it tells
the consumer the schema.
"""

from __future__ import annotations

from .batch import Batch
from .channel import ChannelWriter, WaitClock
from .errors import ChannelTimeoutError, RecordTooLargeError
from .partition import Partitioner, split
from .plan import OutputSpec

__all__ = ["OutputWriter"]


class OutputWriter:
    """Writes one output edge of an operator instance (see the module doc)."""

    def __init__(self, spec: OutputSpec, names: dict[str, str], nap_ns: int = 0, clock: WaitClock | None = None) -> None:
        self.writers = [ChannelWriter(names[label], nap_ns=nap_ns, clock=clock) for label in spec.channels]
        self.partitioner: Partitioner | None = None if spec.partitioner is None else spec.partitioner()
        self.drop = spec.drop
        self.port = spec.port
        self.bytes_out = 0
        self.dropped = 0
        self._silent = set(range(len(self.writers)))  # channels that carried nothing yet

    def write(self, batch: Batch) -> None:
        if batch.num_rows == 0:
            for i in sorted(self._silent):
                self._write(i, batch)
            return
        n = len(self.writers)
        ids = 0 if self.partitioner is None else self.partitioner.assign(batch, n)
        for i, part in enumerate(split(batch, ids, n)):
            if part is not None:
                self._write(i, part)

    def _write(self, i: int, part: Batch) -> None:
        writer = self.writers[i]
        try:
            if self.drop:
                try:
                    writer.write(part, timeout=0)
                except ChannelTimeoutError:
                    self.dropped += part.num_rows
                    return
            else:
                writer.write(part)
        except RecordTooLargeError:  # more than half the ring: send it in halves, in order
            if part.num_rows < 2:
                raise
            half = part.num_rows // 2
            self._write(i, part.slice(0, half))
            self._write(i, part.slice(half, part.num_rows))
            return
        self._silent.discard(i)
        self.bytes_out += part.nbytes

    def write_barrier(self, checkpoint_id: int) -> None:
        for writer in self.writers:
            writer.write_barrier(checkpoint_id)

    def write_watermark(self, watermark: int) -> None:
        """To every channel: a watermark crosses keyed and round-robin edges whole."""
        for writer in self.writers:
            writer.write_watermark(watermark)

    def write_status(self, idle: bool) -> None:
        for writer in self.writers:
            writer.write_status(idle)

    def close(self) -> None:
        """END_OF_STREAM on every channel, after everything written."""
        for writer in self.writers:
            writer.close()
