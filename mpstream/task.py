"""A task: one OS process running one instance of a node and the operators chained to it.

Life of a task::

    open every operator -> restore (from a checkpoint) -> TaskReady
    -> RUNNING: a source task polls its source; any other reads its input gate. Between records
       it fires due timers and handles the coordinator's messages (checkpoint triggers, commit
       notifications, stop, finish); with nothing to do it sleeps on its inputs (futexes) or
       its control pipe until its next timer.
    -> end of input: close every operator (head first), END_OF_STREAM on every output,
       TaskDrained. With checkpoints the task then waits, still answering checkpoint triggers,
       until the job's final checkpoint is committed and the coordinator says Finish.
    -> TaskFinished (statistics), exit.

A task that gets Finish while running (after a stop with a checkpoint) exits without closing
its operators: its input did not end, and a resumed job goes on from the checkpoint.

At BARRIER(n) (a source: at the coordinator's trigger, between two polls) the task calls
every operator's ``prepare_snapshot_pre_barrier`` and ``snapshot`` (head first, so output a
chained operator gets before the barrier is in its snapshot), forwards BARRIER(n) on every
output, and leaves pickling, writing and acknowledging to a writer thread: processing pauses
only for the in-memory copy. An unaligned checkpoint (:mod:`mpstream.barrier`) snapshots at the
first of the coordinator's trigger and BARRIER(n), and is written once its in-flight records
are copied.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import gc
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from . import messages as msg
from .barrier import UNALIGNED, AlignedBarrierHandler, AtLeastOnceBarrierHandler, BarrierHandler, InFlightCopy
from .batch import Batch
from .channel import ChannelReader, Doorbells, InputGate, RecordKind, SharedCounters, WaitClock
from .checkpoint import CheckpointStore, OperatorSnapshot, restore_from
from .counters import Board
from .errors import ChannelClosedError, CheckpointError, PeerDiedError, SharedMemoryFullError
from .metrics import InstanceStats
from .operators import Context, Output, own_key_groups
from .output import CollectOutput, OutputWriter
from .partition import split
from .plan import MAIN, OperatorSpec, TaskSpec
from .sources import Source
from .timers import TimerService
from .watermarks import MAX_TIME, MIN_TIME, WatermarkGenerator, WatermarkValve

__all__ = ["TaskConfig", "Task", "task_main"]

#: How often a task writes its operators' counters to the job's board (mpstream.counters).
PUBLISH_INTERVAL_S = 0.25
#: A parked task wakes this often to check that the processes it reads and writes live; the
#: coordinator notices a dead one at once (its sentinel) and stops the others anyway.
TASK_NAP_NS = 1_000_000_000
#: A source whose poll() returned nothing and that names no time to ask again is asked after
#: 1 ms, then doubling up to this while nothing comes.
MAX_SOURCE_BACKOFF_S = 0.05
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class TaskConfig:
    """How the job runs this attempt: its checkpoint directory (None: no checkpoints), whether
    barriers align (exactly-once), the checkpoint to restore from (None: a fresh start), the
    doorbells segment the coordinator rings after it sends a task a message, the job's
    counters board, and the attempt's shared counters (:attr:`~mpstream.operators.Context.claim`)."""

    checkpoint_dir: str | None = None
    exactly_once: bool = True
    restore_from: int | None = None
    doorbells: str = ""
    counters: str = ""
    shared: SharedCounters | None = None


class _OperatorRaised(Exception):
    """An operator's code raised: the wrapped exception is the cause."""

    def __init__(self, name: str, instance: int) -> None:
        super().__init__(name, instance)
        self.name, self.instance = name, instance


def _items(out: Output, name: str) -> Iterator[Any]:
    """An iterator over an operator's output that is an iterable of batches or mappings."""
    try:
        return iter(out)
    except TypeError as exc:
        raise _bad_output(out, name, exc) from exc


_END = object()  # the end of an operator's output (None is an item: an error)


def _next_batch(items: Iterator[Any], out: Output, name: str) -> Batch | None:
    """The next batch of an operator's output (an iterator's items are made when asked for:
    a generator's rows need not all be in memory at once), None after the last."""
    item = next(items, _END)
    return None if item is _END else _batch_of(item, out, name)


def _batch_of(item: Any, out: Output, name: str) -> Batch:
    """An item of an operator's output (a Batch, or a mapping of columns) as a batch."""
    if isinstance(item, Batch):
        return item
    try:
        return Batch(item)
    except (TypeError, ValueError, AttributeError) as exc:
        raise _bad_output(out, name, exc) from exc


def _bad_output(out: Output, name: str, exc: Exception) -> TypeError:
    return TypeError(f"operator {name!r} returned {type(out).__name__}: return a Batch, a mapping of columns, "
                     f"an iterable of those, or None ({exc})")


class ChainedOperator:
    """One operator instance of a task, with its timers, statistics and outputs: chained
    operators of the same task get its output by a call, others through channels."""

    def __init__(self, spec: OperatorSpec, task: Task, names: dict[str, str]) -> None:
        node = spec.node
        self.name, self.instance, self.task = node.name, spec.instance, task
        self.timers = TimerService(task.wake_at)
        self.ctx = Context(node.name, spec.instance, node.parallelism, self.timers, task.checkpointing,
                           side_output=lambda port, out: self.emit(out, port), ports=spec.ports,
                           claim=functools.partial(task.config.shared.next, node.name))
        self.stats = InstanceStats(node.name, spec.instance, task.spec.name, counters=self.ctx.counters)
        self.collect = node.collect
        self.partitioning = node.partitioning
        self.spec_event_time = node.event_time
        self.outputs = [OutputWriter(o, names, TASK_NAP_NS, task.clock) for o in spec.outputs]
        self.next: list[tuple[ChainedOperator, str]] = []  # chained successors and the port they read
        self._routes: dict[str, tuple[list[ChainedOperator], list[OutputWriter]]] = {}  # by port, made by emit
        self.finished = False  # close() ran (in this attempt or before the restored checkpoint)
        self.watermark = MIN_TIME  # this operator's event time
        self._announced: set[str] = set()  # ports that carried a batch (so downstream knows its schema)
        self.op = self.call(node.make)

    def chain(self, successors: list[tuple[ChainedOperator, str]]) -> None:
        """The chained operators that get this one's output, each with the port it reads."""
        self.next = successors
        self._routes.clear()

    def call(self, fn: Any, *args: Any) -> Any:
        """Runs operator code; an exception is reported as raised by this operator."""
        try:
            return fn(*args)
        except _OperatorRaised:
            raise
        except Exception as exc:
            raise _OperatorRaised(self.name, self.instance) from exc

    def batches(self, out: Output) -> Iterator[Batch]:
        """This operator's output (a Batch, a mapping of columns, or an iterable of those) as
        batches, each made when asked for; what its code raises meanwhile names it."""
        if isinstance(out, Batch):  # the common cases first: no iterator to go through
            return (out,)
        if isinstance(out, Mapping):
            return (self.call(_batch_of, out, out, self.name),)
        items = self.call(_items, out, self.name)
        return iter(lambda: self.call(_next_batch, items, out, self.name), None)

    def process(self, batch: Batch) -> None:
        self.stats.records_in += batch.num_rows
        self.stats.batches_in += 1
        self.emit(self.call(self.op.process, batch))

    def emit(self, out: Output, port: str = MAIN) -> None:
        """Hands output of this operator (on one of its ports) on: to chained operators that
        read the port, to its channels, and for a collect sink to the coordinator."""
        if out is None:
            return
        route = self._routes.get(port)
        if route is None:  # the chained successors and the channels that read port
            route = self._routes[port] = ([successor for successor, wanted in self.next if wanted == port],
                                          [output for output in self.outputs if output.port == port])
        chained, outputs = route
        for batch in self.batches(out):
            rows = batch.num_rows
            if rows == 0 and port in self._announced:
                continue
            if self.task.outputs_closed:
                raise _OperatorRaised(self.name, self.instance) from RuntimeError(
                    f"operator {self.name!r} emitted output after the end of its input; emit everything in close()")
            self._announced.add(port)
            if rows:
                self.stats.records_out += rows
                self.stats.batches_out += 1
            if self.collect:
                self.task.collected.add(self.name, batch, self.task.epoch)
            if chained:
                view = batch.read_only()  # as through a ring: a successor's input is not its own
                for successor in chained:
                    successor.process(view)
            for output in outputs:
                self._own_errors(output.write, batch)

    def fire_timers(self, now: float) -> None:
        for timer in self.timers.due_processing(now):
            self.emit(self.call(self.op.on_timer, timer))

    def advance(self, watermark: int) -> None:
        """The operator's event time moves to ``watermark``: its due event-time timers fire and
        ``on_watermark`` runs (their output goes first), then the watermark goes on to chained
        operators and channels (Flink: an operator processes a watermark completely before it
        forwards it)."""
        if watermark <= self.watermark or self.finished:
            return
        self.watermark = watermark
        for timer in self.timers.due_event(watermark):
            self.emit(self.call(self.op.on_timer, timer))
        self.emit(self.call(self.op.on_watermark, watermark))
        for successor, _ in self.next:
            successor.advance(watermark)
        self.to_outputs(lambda output: output.write_watermark(watermark))

    def status(self, idle: bool) -> None:
        """The task's input went idle (or active again): tell everything downstream."""
        for successor, _ in self.next:
            successor.status(idle)
        self.to_outputs(lambda output: output.write_status(idle))

    def to_outputs(self, write: Callable[[OutputWriter], None]) -> None:
        """``write(output)`` for every output of the operator: a control record (a watermark,
        a status, a barrier, the end)."""
        for output in self.outputs:
            self._own_errors(write, output)

    def _own_errors(self, write: Callable[..., None], *args: Any) -> None:
        """``write(*args)`` to one of this operator's outputs: a full /dev/shm while its ring
        reserves pages is this operator's error, whatever the record (a batch or a control
        record), not the task head's."""
        try:
            write(*args)
        except SharedMemoryFullError as exc:
            raise _OperatorRaised(self.name, self.instance) from exc


class Task:
    """One process of a job (see the module doc)."""

    def __init__(self, spec: TaskSpec, slot: int, names: dict[str, str], conn: Connection,
                 config: TaskConfig) -> None:
        self.spec, self.conn, self.config = spec, conn, config
        self.doorbell = Doorbells.open(config.doorbells).slot(slot)  # rung with every message sent
        board = Board.open(config.counters)
        self.counters = board.task(slot, [i for i, op in enumerate(board.meta["operators"]) if op[2] == slot])
        self.clock = self.counters.clock  # every wait of this process: for input, credit or a message
        self._publish_at = 0.0  # time.time() at which the counters go to the board next
        self._published = 0  # the head's records in then (a source's: the rows it polled)
        self.checkpointing = config.checkpoint_dir is not None
        self.store = CheckpointStore(config.checkpoint_dir) if self.checkpointing else None
        self.epoch = config.restore_from or 0  # the last barrier this task passed
        self.outputs_closed = False
        self.finishing = False  # Finish arrived: exit
        self.stopped = False  # a stop's barrier went out (a source produces nothing more)
        self.ended = False  # the input ended (or EndInput arrived, for a source)
        self.restoring = False  # in _restore: a failure there would fail again
        self.copying: InFlightCopy | None = None  # an unaligned checkpoint's in-flight data, being copied
        self._replay: list[tuple[str, list[tuple[int, Any]]]] | None = None  # restored in-flight data
        self._sending = threading.Lock()  # the snapshot writer sends acks from its thread
        self.collected = CollectOutput(lambda message: self.send(message, out_of_band=True))
        self._writer = ThreadPoolExecutor(1, "snapshot-writer") if self.checkpointing else None
        self._next_timer = float("inf")  # time.time() of the earliest processing-time timer
        self.operators = [ChainedOperator(op, self, names) for op in spec.operators]
        by_name = {op.name: op for op in self.operators}
        for op, op_spec in zip(self.operators, spec.operators):
            op.chain([(by_name[name], port) for name, port in op_spec.chained])
        self.head = self.operators[0]
        readers = [ChannelReader(names[label], nap_ns=TASK_NAP_NS, clock=self.clock) for label in spec.inputs]
        self.gate = InputGate(readers, self.clock) if readers else None
        handler = AlignedBarrierHandler if config.exactly_once else AtLeastOnceBarrierHandler
        self.barriers: BarrierHandler | None = handler(self.gate) if self.gate else None
        self.valve = WatermarkValve(len(readers)) if readers else None
        event_time = self.head.spec_event_time
        self.generator = None if event_time is None else WatermarkGenerator(event_time, f"source {self.head.name!r}")
        self._control_poll = select.poll()  # reused: Connection.poll() builds a selector each call
        self._control_poll.register(conn.fileno(), select.POLLIN)

    # ---- control --------------------------------------------------------------------------

    def send(self, message: Any, out_of_band: bool = False) -> None:
        """Sends a message to the coordinator; ``out_of_band``: its buffers go straight from
        their memory (:func:`~mpstream.messages.send_out_of_band`), copied by nothing else."""
        with self._sending:
            if out_of_band:
                msg.send_out_of_band(self.conn, message)
            else:
                self.conn.send(message)

    def _control(self, timeout: float = 0.0) -> None:
        """Handles the coordinator's messages, waiting up to timeout for the first. A busy
        task calls it only when its doorbell rang (a load, not a system call)."""
        self.doorbell.answer()
        if timeout > 0:
            with self.clock.waiting(WaitClock.INPUT):
                ready = self._control_poll.poll(min(timeout, 3600.0) * 1000.0)
        else:
            ready = self._control_poll.poll(0)
        while ready:
            message = self.conn.recv()
            if isinstance(message, msg.TriggerCheckpoint):
                if message.checkpoint_id > self.epoch:  # a drained task may be asked after its barrier came
                    self._checkpoint(message.checkpoint_id, 0.0, message.unaligned)
                self.stopped |= message.stop
            elif isinstance(message, msg.CheckpointCommitted):
                for op in self.operators:
                    op.call(op.op.notify_checkpoint_complete, message.checkpoint_id)
            elif isinstance(message, msg.EndInput):
                self.ended = True
            elif isinstance(message, msg.Finish):
                self.finishing = True
            ready = self._control_poll.poll(0)

    def _told_to_finish(self) -> bool:
        """After a peer process exited: whether the coordinator told this task to finish too
        (after a stop every task exits; a neighbour may go first). Waits a little for it."""
        deadline = time.monotonic() + 1.0
        while not self.finishing and time.monotonic() < deadline:
            self._control(timeout=deadline - time.monotonic())
        return self.finishing

    def wake_at(self, at: float) -> None:
        """A processing-time timer was registered for ``at``."""
        self._next_timer = min(self._next_timer, at)

    def _tick(self) -> None:
        """Between two records or polls: fires the processing-time timers due by now, and
        writes the counters to the board when that is due."""
        now = time.time()
        if now >= self._publish_at:
            self._publish_at = now + PUBLISH_INTERVAL_S
            self._publish()
        if now >= self._next_timer:
            self._fire_timers(now)

    def _wake_at(self) -> float:
        """The time.time() by which a parked task wakes: its next timer, and, while its counts
        changed since they went to the board, its next publish (a burst then a quiet input
        is on the board within a publish interval, not when the next record comes)."""
        if self.head.stats.records_in != self._published:
            return min(self._next_timer, self._publish_at)
        return self._next_timer

    def _publish(self) -> None:
        self._published = self.head.stats.records_in
        for op in self.operators:
            op.stats.bytes_out = sum(o.bytes_out for o in op.outputs)
            op.stats.dropped = sum(o.dropped for o in op.outputs)
            op.stats.watermark = None if op.watermark == MIN_TIME else op.watermark
        fill = max((reader.fill() for reader in self.gate.readers), default=0.0) if self.gate else 0.0
        self.counters.publish([op.stats for op in self.operators], fill)

    def _fire_timers(self, now: float) -> None:
        self._next_timer = float("inf")
        for op in self.operators:
            op.fire_timers(now)
        self._next_timer = min([self._next_timer] + [t for op in self.operators
                                                      if (t := op.timers.next_processing_time()) is not None])

    # ---- checkpoints ----------------------------------------------------------------------

    def _checkpoint(self, checkpoint_id: int, alignment_s: float, unaligned: bool = False) -> None:
        """Snapshots every operator in memory, forwards BARRIER(n), and leaves the writing to
        the writer thread (see the module doc); unaligned, once the in-flight data is copied."""
        started = time.perf_counter()
        for op in self.operators:  # output that belongs before the barrier: chained ones see it first
            op.emit(op.call(op.op.prepare_snapshot_pre_barrier, checkpoint_id))
        self.collected.flush(self.epoch)  # before this task's acknowledgement: kept if n is restored
        self.epoch = checkpoint_id  # what a collect sink gets from now on, a restore from n replays
        snapshots = {op.name: OperatorSnapshot(op.call(op.op.snapshot), op.timers.snapshot(), op.finished,
                                               op.watermark) for op in self.operators}
        head = snapshots[self.head.name]
        if self.valve is not None:
            head.valve = self.valve.state(self.spec.producers)
        if self.generator is not None:
            head.generator = self.generator.state()
        pause = time.perf_counter() - started
        if not self.outputs_closed:
            barrier = checkpoint_id | UNALIGNED if unaligned else checkpoint_id
            for op in self.operators:
                op.to_outputs(lambda output: output.write_barrier(barrier))
        if unaligned and self.gate is not None and self.gate.live and not self.outputs_closed:  # else: all read
            passed = self.barriers.abandon(checkpoint_id)  # aligning it: it timed out and turned unaligned
            self.copying = InFlightCopy(checkpoint_id, self.gate, snapshots, pause, passed)
            self._copy_in_flight()
        else:
            self._writer.submit(self._persist, checkpoint_id, snapshots, alignment_s, pause)

    def _copy_in_flight(self) -> None:
        """Copies what the channels got since the last look; once every channel's barrier was
        found, the snapshots and the in-flight data go to the writer thread."""
        copy = self.copying
        if not copy.scan():
            return
        self.copying = None
        copy.snapshots[self.head.name].in_flight = {self.spec.producers[channel]: records
                                                    for channel, records in copy.records.items() if records}
        self._writer.submit(self._persist, copy.checkpoint_id, copy.snapshots, time.perf_counter() - copy.started,
                            copy.pause_s)

    def _persist(self, checkpoint_id: int, snapshots: dict[str, OperatorSnapshot], alignment_s: float,
                 pause: float) -> None:
        """Writes the snapshots, then acknowledges: one writer thread, checkpoints in order, and
        no acknowledgement before every snapshot of this one is written. So once checkpoint n
        commits, no snapshot up to n is read any more: operators may reuse their memory then
        (``Aggregate`` does)."""
        try:
            states = {}
            for name, snapshot in snapshots.items():
                try:
                    state = self.store.write_state(checkpoint_id, name, self.spec.instance, snapshot)
                except Exception as exc:  # noqa: BLE001 - a failed checkpoint, reported, not a failed job
                    raise CheckpointError(f"operator {name!r} instance {self.spec.instance}: {exc}") from exc
                states[f"{name}-{self.spec.instance}"] = state
            self.send(msg.AcknowledgeCheckpoint(checkpoint_id, states, alignment_s, pause))
        except CheckpointError as exc:
            self.send(msg.DeclineCheckpoint(checkpoint_id, str(exc)))

    def _restore(self, checkpoint_id: int) -> None:
        """Puts back every operator's state of the checkpoint (:func:`~mpstream.checkpoint.restore_from`):
        its own at an unchanged parallelism (every instance's, in instance order, for an operator
        that ``restores_all``); else, for a rescalable operator, the states of every old instance
        to pick its key groups from, with the timers of its key groups and (from the old instance
        of its own index, if any) its unkeyed ones."""
        store = self.store
        for op in self.operators:
            which = restore_from(store, checkpoint_id, op.name, op.ctx.parallelism, op.op.rescalable, op.partitioning)
            own = [store.read_state(checkpoint_id, op.name, op.instance)] if which is None else None
            snaps = own or [store.read_state(checkpoint_id, op.name, i) for i in which]
            op.ctx.rescaled = own is None
            if op.op.restores_all and own is not None:
                op.call(op.op.restore, [own[0].operator if i == op.instance else
                                        store.read_state(checkpoint_id, op.name, i).operator
                                        for i in range(store.instances(checkpoint_id, op.name))])
            elif own is not None or op.op.rescalable:
                op.call(op.op.restore, [s.operator for s in snaps])
            mine = own_key_groups(op.ctx)
            op.timers.restore([t for i, s in enumerate(snaps) for t in s.timers
                               if own is not None or (t.key_group in mine if t.key_group is not None
                                                      else i == op.instance)])
            op.finished = all(s.finished for s in snaps)
            if op is not self.head and any(s.in_flight for s in snaps):
                raise CheckpointError(f"operator {op.name!r}: checkpoint {checkpoint_id} holds in-flight rows it had not "
                                      f"processed, and at these parallelisms it is chained to {self.head.name!r}; "
                                      f"give it chain=False, or resume at the parallelisms the checkpoint was taken at")
            op.watermark = min(s.watermark for s in snaps)  # equal at an aligned checkpoint
            if op is self.head:
                producers_changed = self._restore_watermarks(snaps, store.in_flight_rows(checkpoint_id) > 0)
                self._replay = self._in_flight(snaps, rescaled=own is None, producers_changed=producers_changed)
            op.ctx.rescaled = False
        if isinstance(self.head.op, Source):
            self.head.stats.start_position = self.head.op.snapshot()

    def _in_flight(self, snaps: list[OperatorSnapshot], rescaled: bool,
                   producers_changed: bool) -> list[tuple[str, list[tuple[int, Any]]]] | None:
        """The head's in-flight records of an unaligned checkpoint, per producing instance, to
        process before its channels. At its old parallelism: its own. At another (``snaps``:
        every old instance's), the rows its input edge routes to this instance now: every new
        instance applies the edge's partitioner, fresh, to the same records in the same order,
        so each row goes to exactly one (a forward edge's records from instance i go to
        instance i mod parallelism; a batch without rows, which carries a schema, to all).
        Records of one producer from several old instances cannot be put back in their order:
        then every row goes first, and after them each producer's newest watermark and status
        (each list of a producer ends at its barrier), so no row falls behind a watermark sent
        after it. When the producers changed (an upstream at another parallelism: rows an old
        producer sent may come again through another), in-flight watermarks and statuses are
        dropped, as the channels restart from the restored output (:meth:`_restore_watermarks`):
        a watermark is a lower bound, the producers' next ones supersede them."""
        saved = [(producer, records) for s in snaps for producer, records in (s.in_flight or {}).items()]
        if not saved:
            return None
        edges = {edge.upstream: edge for edge in self.spec.head.node.inputs}
        parallelism, instance = self.head.ctx.parallelism, self.spec.instance
        routed = []
        for producer, records in saved:
            upstream, old = producer.rsplit(".", 1)
            if producers_changed:
                records = [(kind, value) for kind, value in records if kind == RecordKind.DATA]
            if upstream not in edges:
                raise CheckpointError(f"operator {self.head.name!r}: the unaligned checkpoint holds in-flight rows from "
                                      f"{upstream!r}, which no longer feeds it; resume with the job that wrote it")
            partitioner = None if edges[upstream].partitioner is None else edges[upstream].partitioner()
            kept = []
            for kind, value in records:
                if kind != RecordKind.DATA or not rescaled or value.num_rows == 0:
                    kept.append((kind, value))
                elif partitioner is None:
                    if int(old) % parallelism == instance:
                        kept.append((kind, value))
                elif (part := split(value, partitioner.assign(value, parallelism), parallelism)[instance]) is not None:
                    kept.append((kind, part))
            routed.append((producer, kept))
        if not rescaled and not producers_changed:
            return routed  # each channel's own records, in its order
        newest: dict[str, dict[int, Any]] = {}
        for producer, kept in routed:
            for kind, value in kept:
                if kind == RecordKind.WATERMARK:
                    events = newest.setdefault(producer, {})
                    events[kind] = max(events.get(kind, value), value)
                elif kind == RecordKind.STATUS:
                    newest.setdefault(producer, {})[kind] = value
        rows = [(producer, [(kind, value) for kind, value in kept if kind == RecordKind.DATA]) for producer, kept in routed]
        return rows + [(producer, sorted(events.items())) for producer, events in newest.items()]

    def _replay_in_flight(self) -> None:
        """Processes the restored in-flight records, per producer in their order, before
        anything the channels bring."""
        replay, self._replay = self._replay, None
        for producer, records in replay:
            for kind, value in records:
                if kind == RecordKind.DATA:
                    self.head.process(value.read_only())
                else:
                    self._event_time(self.spec.producers.index(producer), RecordKind(kind), value)

    def _restore_watermarks(self, snaps: list[OperatorSnapshot], in_flight: bool) -> bool:
        """The head's input watermarks: per producing instance, the lowest any old instance saw
        (at an aligned checkpoint every consumer instance had the same from one producer; at an
        unaligned one each took its snapshot at another point of the producer's stream, and
        in-flight rows replayed here may precede the higher ones). When the producers changed
        (an upstream at another parallelism) and the checkpoint holds ``in_flight`` rows, every
        channel starts at the restored output, still idle if it was (a producer says so once):
        rows an old producer had not sent may come through another now, behind that one's old
        watermark. A source's generator likewise. Returns whether the producers changed."""
        changed = False
        if self.valve is not None:
            saved = [s.valve for s in snaps if s.valve is not None]
            if saved:
                channels: dict[str, Any] = {}
                for state in saved:
                    for producer, channel in state["channels"].items():
                        if producer not in channels or channel[0] < channels[producer][0]:
                            channels[producer] = channel
                changed = set(channels) != set(self.spec.producers)
                output = min(s["output"] for s in saved)
                if changed and in_flight:  # at the output, each keeping whether it was idle
                    channels = {p: (output, c[1], not c[1]) for p, c in channels.items()}
                self.valve.restore(output, [channels.get(p) for p in self.spec.producers])
        if self.generator is not None and snaps[0].generator is not None:
            self.generator.restore(snaps[0].generator)
        return changed

    # ---- running --------------------------------------------------------------------------

    def run(self) -> None:
        started, cpu = time.perf_counter(), time.process_time()
        for op in self.operators:
            op.call(op.op.open, op.ctx)
        if self.config.restore_from is not None:
            self.restoring = True
            self._restore(self.config.restore_from)
            self.restoring = False
        self.send(msg.TaskReady(any(op.op.commits_on_checkpoint for op in self.operators)))
        if self.config.restore_from is not None and not self.head.finished:
            self._announce()
        if not self.head.finished:
            try:
                self._run_source() if self.gate is None else self._run_operator()
            except (PeerDiedError, ChannelClosedError):
                if not self._told_to_finish():
                    raise
        if not self.finishing:
            self._end_input()
        if isinstance(self.head.op, Source):
            self.head.stats.position = self.head.call(self.head.op.snapshot)  # where it ended or stopped
        if self.gate is not None:
            self.gate.close()
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # acks before the statistics
        head = self.head.stats
        head.idle_s = self.clock.seconds(WaitClock.INPUT)
        head.backpressured_s = self.clock.seconds(WaitClock.CREDIT)
        head.busy_s = max(0.0, time.perf_counter() - started - head.idle_s - head.backpressured_s)
        head.cpu_s = time.process_time() - cpu
        self._publish()
        self.counters.end()
        self.collected.flush(self.epoch)  # after a stop: what came after its barrier
        self.send(msg.TaskFinished(tuple(op.stats for op in self.operators)))

    def _announce(self) -> None:
        """After a restore, tells everything downstream this task's event time and status once
        more: a consumer at another parallelism may have restarted its channel from a lower
        watermark, or not know that a producer new since is idle (a task says so only when its
        status changes). Repeats are harmless: a valve drops regressions and unchanged statuses."""
        idle = self.valve.idle if self.valve is not None else self.generator is not None and self.generator.idle
        for op in self.operators:
            if op.watermark == MIN_TIME and not idle:
                continue  # no event time here (yet)
            if op.watermark > MIN_TIME:
                op.to_outputs(lambda output: output.write_watermark(op.watermark))
            op.to_outputs(lambda output: output.write_status(idle))

    def _end_input(self) -> None:
        """The end of the input is WATERMARK(+inf): every window fires first. Then it closes
        the operators (head first: a chained one gets its upstream's final output before it
        closes), ends every output, and with checkpoints waits for Finish."""
        self.head.advance(MAX_TIME)
        for op in self.operators:
            if not op.finished:
                op.emit(op.call(op.op.close))
                op.finished = True
        for op in self.operators:
            op.to_outputs(OutputWriter.close)
        self.outputs_closed = True
        self.collected.flush(self.epoch)
        if self._writer is not None:  # after the acks of every checkpoint taken so far
            self._writer.submit(self.send, msg.TaskDrained())
        else:
            self.send(msg.TaskDrained())
        while self.checkpointing and not self.finishing:  # triggers of the final checkpoint(s)
            self._control(timeout=1.0)

    def _watermark_after(self, batch: Batch | None) -> None:
        """A source's watermark after a batch it produced (its status back to active first, if
        it had gone idle; None: only that)."""
        generator = self.generator
        if generator.idle:
            generator.idle = False
            self.head.status(False)
        if batch is None:
            return
        # the time blocked on credit matters only to an idle timeout
        blocked = self.clock.seconds(WaitClock.CREDIT) if generator.spec.idle_timeout is not None else 0.0
        watermark = generator.on_batch(batch, blocked)
        if watermark is not None:
            self.head.advance(watermark)

    def _run_source(self) -> None:
        head, source = self.head, self.head.op
        backoff = 0.001
        generator = self.generator
        probe_at = float("inf") if generator is None else time.monotonic() + generator.spec.interval
        if generator is not None and not head.call(source.has_input):
            generator.idle = True  # nothing to read: it holds no watermark back
            head.status(True)
        while not (self.finishing or self.ended):
            self._tick()
            if self.doorbell.rung:  # between two polls: a barrier goes after a whole batch
                self._control()
            if time.monotonic() >= probe_at:
                probe_at = time.monotonic() + generator.spec.interval
                if generator.probe(self.clock.seconds(WaitClock.CREDIT)):
                    head.status(True)
            if self.stopped:  # a stop's barrier went out: nothing more, until Finish
                self._control(timeout=1.0)
                continue
            if self.finishing or self.ended:
                break
            try:
                out = head.call(source.poll)
            except _OperatorRaised as raised:
                if isinstance(raised.__cause__, StopIteration):
                    break
                raise
            produced = False
            for batch in () if out is None else head.batches(out):  # a generator's: made as they go on
                head.stats.records_in += batch.num_rows
                head.stats.batches_in += 1
                if generator is not None and generator.idle:
                    self._watermark_after(None)  # active again before its rows
                head.emit(batch)
                if generator is not None:
                    self._watermark_after(batch)
                produced = True
            if produced:
                backoff = 0.001
                continue
            now = time.time()
            awake = head.call(source.next_awake)
            wake = min(now + backoff if awake is None else awake, self._wake_at(),
                       now + max(0.0, probe_at - time.monotonic()))
            backoff = min(2 * backoff, MAX_SOURCE_BACKOFF_S)
            self._control(timeout=wake - now)  # a trigger or a stop wakes it at once

    def _run_operator(self) -> None:
        gate, barriers, head = self.gate, self.barriers, self.head
        if self._replay is not None:
            self._replay_in_flight()
        while not self.finishing:
            ended = gate.done
            if self.copying is not None:
                self._copy_in_flight()
            checkpoint_id = barriers.complete()
            if checkpoint_id is not None:
                self._checkpoint(checkpoint_id, time.perf_counter() - barriers.started)
            if ended:
                return
            self._tick()
            if self.doorbell.rung:
                self._control()
                if self.finishing:
                    return
            wake = self._wake_at()
            got = gate.wait(None if wake == float("inf") else max(0.0, wake - time.time()),
                            self.doorbell)  # input, a message or the next timer: whichever comes first
            if got is None:
                continue
            channel, record = got
            with record:
                if self.copying is not None:
                    self.copying.before_taking(channel)
                kind = record.kind
                if kind is RecordKind.DATA:
                    head.process(record.batch)
                elif kind is RecordKind.BARRIER:
                    checkpoint_id = record.value & ~UNALIGNED
                    if checkpoint_id <= self.epoch:
                        pass  # taken already: unaligned at another sign of it, or when aligning it timed out
                    elif record.value & UNALIGNED:  # its first sign
                        self._checkpoint(checkpoint_id, 0.0, unaligned=True)
                    else:
                        barriers.on_barrier(channel, checkpoint_id)
                else:
                    self._event_time(channel, kind, record.value)

    def _event_time(self, channel: int, kind: RecordKind, value: int | None) -> None:
        """A watermark, a status or the end of a channel (WATERMARK(+inf)) through the valve."""
        if kind is RecordKind.STATUS:
            watermark, idle = self.valve.status(channel, bool(value))
        else:
            watermark = self.valve.watermark(channel, MAX_TIME if kind is RecordKind.END_OF_STREAM else value)
            idle = None
        if watermark is not None:
            self.head.advance(watermark)
        if idle is not None:
            self.head.status(idle)


def _prepare_worker_process(parent: int, name: str) -> None:
    """SIGKILL this worker when the coordinator dies (even by SIGKILL), name the process after
    its task (``ps``, ``top``: at most 15 bytes), and keep freed batch buffers in the heap:
    glibc otherwise maps every buffer above 128 KiB afresh and unmaps it on free, so each
    batch pays its page faults again (they cost a shuffle half its time). A fatal signal
    (SIGSEGV, SIGBUS...) prints the worker's Python stack to its stderr (faulthandler) before
    the coordinator reports the death. The objects inherited from the coordinator are frozen
    out of the garbage collector: the worker's first collection (its young-object count comes
    over at about 600 of 700) otherwise writes to every one of them, a copy-on-write fault per
    page (about 200 pages at each start)."""
    gc.freeze()
    if not faulthandler.is_enabled() and sys.stderr is not None:
        faulthandler.enable(all_threads=True)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    if hasattr(libc, "mallopt"):  # glibc
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def task_main(spec: TaskSpec, slot: int, names: dict[str, str], conn: Connection, parent: int,
              config: TaskConfig) -> None:
    """The entry point of a task's (forked) process."""
    _prepare_worker_process(parent, spec.name)
    # Ctrl-C, SIGTERM and SIGUSR1 are the coordinator's (a terminal or `docker stop` signals the
    # whole process group): a task ends when the coordinator says so, or dies with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the coordinator forks with them blocked
    task = None
    try:
        task = Task(spec, slot, names, conn, config)
        task.run()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator, which raises
        if isinstance(exc, _OperatorRaised):
            name, instance, exc = exc.name, exc.instance, exc.__cause__
        else:
            name, instance = spec.head.name, spec.instance
        trace = "".join(traceback.format_exception(exc))
        report = msg.TaskFailed(name, instance, f"{type(exc).__name__}: {exc}", trace,
                                restoring=task is not None and task.restoring)
        try:  # through the task's lock: its snapshot writer may be sending an ack
            task.send(report) if task is not None else conn.send(report)
        finally:
            code = 1
    conn.close()
    os._exit(code)  # no atexit handlers or finalizers inherited from the coordinator
