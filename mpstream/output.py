"""The output side of an operator instance: one :class:`OutputWriter` per output edge, and
for a task's collect sinks one :class:`CollectOutput`.

An OutputWriter picks the target channel of every row (a partitioner, or the one channel of
a forward edge), orders the rows by channel once (a stable counting sort), and writes each
part, gathering its rows straight into the ring when no column is a string one (no copy of
the batch in partition order first): blocking while the channel has no credit, or, under the drop policy, shedding the part and
counting its rows. A part larger than the ring takes (about half of it) is written in halves,
in order. A batch without rows is written only to channels that have carried nothing yet: it
tells the consumer the schema.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from .batch import Batch, StringColumn
from .channel import ChannelWriter, WaitClock
from .errors import ChannelTimeoutError, RecordTooLargeError
from .messages import Collected
from .partition import ALL, Partitioner, partition_rows
from .plan import OutputSpec

__all__ = ["OutputWriter", "CollectOutput"]

#: A collect sink's batch of this size or more goes to the coordinator at once, out of band
#: from its own memory; smaller ones are copied and go together: a message costs the task and
#: the coordinator a few system calls and a wake-up each, tens of microseconds on a busy VM.
COLLECT_ALONE_BYTES = 64 << 10
#: The small batches gathered (all sinks) that make a task send them.
COLLECT_FLUSH_BYTES = 1 << 20
#: What a gathered batch counts for beyond its bytes (its objects, and its share of the
#: flush's work): a flush of a million 1-row batches would stall a checkpoint's barrier.
COLLECT_BATCH_COST = 1024


class CollectOutput:
    """The batches a task's collect sinks produced, on their way to the coordinator: one
    :class:`~mpstream.messages.Collected` per sink and flush. The task flushes at each
    checkpoint's barrier (the batches' epoch ends there) and at its end; a flush also comes
    with every COLLECT_FLUSH_BYTES gathered, and before a batch that goes alone (order kept)."""

    def __init__(self, send: Callable[[Collected], None]) -> None:
        self._send = send
        self._pending: dict[str, list[Batch]] = {}
        self._bytes = 0

    def add(self, sink: str, batch: Batch, epoch: int) -> None:
        """batch (produced after barrier epoch) for sink; it may be a view on a ring record."""
        nbytes = batch.nbytes
        if nbytes >= COLLECT_ALONE_BYTES:
            self.flush(epoch)
            self._send(Collected(sink, (batch,), epoch))
            return
        self._pending.setdefault(sink, []).append(batch.copy())  # its record goes back to the ring
        self._bytes += nbytes + COLLECT_BATCH_COST
        if self._bytes >= COLLECT_FLUSH_BYTES:
            self.flush(epoch)

    def flush(self, epoch: int) -> None:
        """Sends what was gathered, all of it produced after barrier epoch: each run of
        batches of one schema as one batch (one object to pickle, not hundreds)."""
        for sink, batches in self._pending.items():
            runs = (list(run) for _, run in itertools.groupby(batches, key=lambda batch: batch.schema))
            self._send(Collected(sink, tuple(Batch.concat(run) if len(run) > 1 else run[0] for run in runs), epoch))
        self._pending.clear()
        self._bytes = 0


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
        gather = None  # a part's rows go straight into its ring: no string column (asked once, if at all)
        for i, rows in enumerate(partition_rows(batch, ids, n)):
            if rows is ALL:  # a forward edge, or every row to one channel: the batch as it is
                self._write(i, batch)
            elif rows is not None:
                if gather is None:
                    gather = not any(isinstance(col, StringColumn) for col in batch.values())
                if gather:
                    self._write(i, batch, rows)
                else:
                    self._write(i, batch.take(rows))

    def _write(self, i: int, batch: Batch, rows: np.ndarray | None = None) -> None:
        """Writes batch, or its rows (a fixed-width batch: gathered into the ring), to channel i."""
        writer = self.writers[i]
        num_rows = batch.num_rows if rows is None else len(rows)
        try:
            if self.drop:
                try:
                    writer.write(batch, timeout=0, rows=rows)
                except ChannelTimeoutError:
                    self.dropped += num_rows
                    return
            else:
                writer.write(batch, rows=rows)
        except RecordTooLargeError:  # more than half the ring: send it in halves, in order
            if num_rows < 2:
                raise
            half = num_rows // 2
            if rows is None:
                self._write(i, batch.slice(0, half))
                self._write(i, batch.slice(half, num_rows))
            else:
                self._write(i, batch, rows[:half])
                self._write(i, batch, rows[half:])
            return
        self._silent.discard(i)
        # a fixed-width batch's bytes are its rows times the bytes of a row
        self.bytes_out += batch.nbytes if rows is None else batch.nbytes // batch.num_rows * num_rows

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
