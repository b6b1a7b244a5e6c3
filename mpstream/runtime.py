"""The coordinator and the workers: one OS process per operator instance.

The coordinator (the process calling ``run``) creates a channel for every (producer instance,
consumer instance) pair of every edge, forks the workers, and unlinks every segment as soon as
all workers have attached, so nothing is left in /dev/shm whatever happens next. Workers die
with the coordinator (``PR_SET_PDEATHSIG``). It then waits on the workers' control pipes and
process sentinels: collected batches, progress and final statistics arrive there, and so do
failures. On any failure it SIGKILLs the remaining workers and raises an error that names the
operator and instance: :class:`OperatorError` with the worker's traceback for an exception,
:class:`WorkerDiedError` for a process that died (a signal, or an exit without a report).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import time
import threading
import traceback
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from . import operators as ops
from .aggregate import Combiner
from .batch import Batch
from .checkpoint import CheckpointError, CheckpointStore
from .channel import Channel, ChannelReader, ChannelTimeoutError, ChannelWriter, InputGate, RecordKind, sweep_stale_segments
from .errors import MpstreamError, RecordTooLargeError
from .partition import split

if TYPE_CHECKING:
    from .pipeline import Node, Pipeline

__all__ = ["execute", "CheckpointConfig", "JobResult", "InstanceStats", "OperatorError", "WorkerDiedError"]

_PROGRESS_INTERVAL_S = 0.25
_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class OperatorError(MpstreamError):
    """An operator raised; the message names it and carries the worker's traceback."""


class WorkerDiedError(MpstreamError):
    """A worker process died without reporting (killed by a signal, or exited)."""


@dataclass
class InstanceStats:
    """What one operator instance did. Times are seconds of its wall clock: busy (running
    operator code and copying), idle (waiting for input) and backpressured (waiting for credit
    on an output)."""

    name: str
    instance: int
    records_in: int = 0
    records_out: int = 0
    batches_in: int = 0
    batches_out: int = 0
    bytes_out: int = 0
    dropped: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    backpressured_s: float = 0.0


@dataclass
class JobResult:
    """``result[sink]`` is the concatenation of a collect sink's batches (a batch without
    columns if none arrived); ``operators`` the
    per-instance statistics; ``dropped`` the records each drop-policy operator shed."""

    collected: dict[str, list[Batch]]
    operators: list[InstanceStats]
    seconds: float
    dropped: dict[str, int] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # per completed checkpoint
    recovery_seconds: list[float] = field(default_factory=list)  # per restart: failure -> running again
    running_at: list[float] = field(default_factory=list)  # time.monotonic() each attempt was running

    @property
    def restarts(self) -> int:
        return len(self.recovery_seconds)

    def __getitem__(self, sink: str) -> Batch:
        return Batch.concat(self.collected[sink])

    def per_operator(self) -> dict[str, dict[str, float]]:
        """Statistics summed over the instances of each operator."""
        out: dict[str, dict[str, float]] = {}
        for s in self.operators:
            row = out.setdefault(s.name, {"instances": 0})
            row["instances"] += 1
            for k, v in asdict(s).items():
                if k not in ("name", "instance"):
                    row[k] = row.get(k, 0) + v
        return out


def _channel_label(consumer: str, ci: int, producer: str, pi: int) -> str:
    return f"{producer}.{pi}-{consumer}.{ci}"


def _prepare_worker_process(parent: int) -> None:
    """SIGKILL this worker when the coordinator dies (even by SIGKILL), and keep freed batch
    buffers in the heap: glibc otherwise maps every buffer above 128 KiB afresh and unmaps it
    on free, so each batch pays its page faults again (they cost a shuffle half its time)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    if hasattr(libc, "mallopt"):  # glibc
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)


@dataclass
class _Output:
    """One output edge of a worker: a writer per target instance, and how to pick one."""

    writers: list[ChannelWriter]
    partitioner: Any  # a Partitioner, or None for forward (a single writer)
    drop: bool
    combiner: Combiner | None


def _plan_channels(pipeline: Pipeline) -> dict[tuple[str, int], dict[str, Any]]:
    """For every (node, instance): the labels of its input channels, and per output edge the
    labels it writes to (index = target instance)."""
    io: dict[tuple[str, int], dict[str, Any]] = {
        (n.name, i): {"inputs": [], "outputs": []} for n in pipeline.nodes for i in range(n.parallelism)}
    for node in pipeline.nodes:
        for edge in node.inputs:
            up = edge.upstream
            for pi in range(up.parallelism):
                targets = [pi] if edge.partitioner is None else range(node.parallelism)
                labels = [_channel_label(node.name, ci, up.name, pi) for ci in targets]
                io[(up.name, pi)]["outputs"].append((labels, edge.partitioner, edge.drop, edge.combiner))
                for ci, label in zip(targets, labels):
                    io[(node.name, ci)]["inputs"].append(label)
    return io


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints every ``interval`` seconds into ``directory``, keeping the last ``retain``;
    the job fails after more than ``tolerable_failures`` failed checkpoints (e.g. disk full).
    When a worker fails, the job restarts from the newest valid checkpoint, up to
    ``restarts`` times, waiting ``restart_backoff`` (doubling) first."""

    directory: str
    interval: float
    retain: int = 3
    tolerable_failures: int = 3
    restarts: int = 3  # recoveries from a failure before the job fails
    restart_backoff: float = 0.1  # seconds before the first restart, doubled for each next
    resume: bool = False  # start from the directory's newest valid checkpoint
    exactly_once: bool = True  # False: no alignment (at-least-once: a restore may replay twice)


def execute(pipeline: Pipeline, *, progress: Callable[[dict[str, Any]], None] | None = None,
            checkpoints: CheckpointConfig | None = None) -> JobResult:
    """Runs every operator instance in its own process until all sources are exhausted and
    every operator has closed; returns the collected results. ``progress(info)`` is called
    about four times a second with the rows the sources have produced so far.

    With ``checkpoints``, the coordinator takes aligned checkpoints while the sources run
    (every interval, and on demand when the coordinator process gets SIGUSR1), and when a
    worker fails (an exception, a signal) it kills the others, restores every
    operator from the newest valid checkpoint, rewinds the sources to its offsets and goes
    on: collect sinks keep only what preceded that checkpoint, so results are exactly once.
    """
    nodes = {n.name: n for n in pipeline.nodes}
    if not nodes:
        raise ValueError("the pipeline has no operators")
    if checkpoints is None or threading.current_thread() is not threading.main_thread():
        return _execute(pipeline, nodes, progress, checkpoints)
    # installed before any worker exists: SIGUSR1's default action would end the coordinator
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: _demanded.set())
    try:
        return _execute(pipeline, nodes, progress, checkpoints)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        _demanded.clear()


_demanded = threading.Event()  # set by SIGUSR1 while a job with checkpoints runs


def _execute(pipeline: Pipeline, nodes: dict, progress, checkpoints: CheckpointConfig | None) -> JobResult:
    store = CheckpointStore(checkpoints.directory, checkpoints.retain) if checkpoints else None
    restore = _restore_point(store) if checkpoints and checkpoints.resume else None
    kept: dict[str, list[tuple[int, Batch]]] = {n.name: [] for n in nodes.values() if n.collect}
    recoveries: list[float] = []  # failure detected -> every worker restored and running again
    failed_at: list[float] = []
    running_at: list[float] = []
    start = time.monotonic()

    def running(at: float) -> None:
        running_at.append(at)
        if len(failed_at) > len(recoveries):
            recoveries.append(at - failed_at[-1])

    while True:
        try:
            result = _attempt(pipeline, nodes, progress, store, checkpoints, restore, kept, start, running)
            result.recovery_seconds, result.running_at = recoveries, running_at
            return result
        except (WorkerDiedError, OperatorError) as exc:
            if store is None or len(failed_at) >= checkpoints.restarts:
                raise
            if len(failed_at) > len(recoveries):  # the restarted attempt failed before running
                recoveries.append(time.monotonic() - failed_at[-1])
            failed_at.append(time.monotonic())
            warnings.warn(f"restarting the job from its last checkpoint after: {exc}", stacklevel=2)
            time.sleep(checkpoints.restart_backoff * 2 ** (len(failed_at) - 1))  # backoff, not synchronisation
            restore = _restore_point(store)
            upto = restore or 0
            for batches in kept.values():  # what followed the checkpoint will be replayed
                batches[:] = [(epoch, b) for epoch, b in batches if epoch < upto]


def _restore_point(store: CheckpointStore) -> int | None:
    """The id of the newest checkpoint that checks out (damaged newer ones are reported)."""
    checkpoint_id, problems = store.latest_valid()
    for problem in problems:
        warnings.warn(f"skipping a damaged checkpoint: {problem}", stacklevel=3)
    return checkpoint_id


def _attempt(pipeline: Pipeline, nodes: dict, progress, store: CheckpointStore | None,
             checkpoints: CheckpointConfig | None,
             restore: int | None, kept: dict, start: float, running: Callable[[float], None]) -> JobResult:
    sweep_stale_segments()
    io = _plan_channels(pipeline)
    channels: dict[str, Channel] = {}
    ctx = multiprocessing.get_context("fork")  # workers inherit the user's functions, lambdas too
    workers: dict[Any, tuple[str, int, Any]] = {}
    try:
        for (name, instance), wiring in io.items():
            for label in wiring["inputs"]:
                channels[label] = Channel(label, pipeline.channel_capacity)
        names = {label: chan.name for label, chan in channels.items()}
        for (name, instance), wiring in io.items():
            ours, theirs = ctx.Pipe()
            if nodes[name].collect:
                _widen(ours, theirs)
            process = ctx.Process(target=_worker_main, name=f"mpstream:{name}[{instance}]",
                                  args=(nodes[name], instance, wiring, names, theirs, os.getpid(),
                                        checkpoints, restore), daemon=True)
            process.start()
            theirs.close()
            workers[ours] = (name, instance, process)
        return _Supervisor(workers, channels, nodes, progress, start, store, checkpoints, kept, running).run()
    finally:
        for conn, (_, _, process) in workers.items():
            if process.is_alive():
                process.kill()
            process.join()
            conn.close()
        for chan in channels.values():
            chan.close()


def _widen(*conns: Connection) -> None:
    """Asks for 4 MiB socket buffers (the kernel caps them at net.core.[rw]mem_max): a collect
    sink's pickled batches then go out without waiting for the coordinator to read each 200 KiB."""
    for conn in conns:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)


class _Supervisor:
    """The coordinator's loop over worker messages and process exits."""

    def __init__(self, workers: dict, channels: dict[str, Channel], nodes: dict, progress, start: float,
                 store: CheckpointStore | None, checkpoints: CheckpointConfig | None,
                 kept: dict[str, list[tuple[int, Batch]]], running: Callable[[float], None]) -> None:
        self.workers, self.channels, self.nodes = workers, channels, nodes
        self.running = running  # told when every worker is ready (restored, about to process)
        self.progress, self.start = progress, start
        self.config = checkpoints
        self.kept = kept  # collected (epoch, batch), across restarts
        self.store = store
        if self.store is not None:
            self.store.discard_incomplete()  # left by a job that died mid-checkpoint
        self.next_id = (self.store.complete() or [0])[-1] + 1 if self.store else 1
        self.next_trigger = time.monotonic() + checkpoints.interval if checkpoints else float("inf")
        self.pending: dict[str, Any] | None = None  # the checkpoint in flight
        self.completed: list[dict[str, Any]] = []
        self.failures = 0
        self.draining = False  # a worker finished: no more checkpoints
        self.stats: list[InstanceStats] = []
        self.produced: dict[tuple[str, int], int] = {}
        self.not_ready = len(workers)
        self.open_conns = dict(workers)
        self.conn_of = {info[2].sentinel: conn for conn, info in workers.items()}
        self.finished: set[tuple[str, int]] = set()

    def run(self) -> JobResult:
        while len(self.finished) < len(self.workers):
            if _demanded.is_set():  # SIGUSR1: a checkpoint now (when none is in flight)
                _demanded.clear()
                self.next_trigger = 0.0
            self._maybe_trigger()
            timeout = min(_PROGRESS_INTERVAL_S, max(0.0, self.next_trigger - time.monotonic()))
            ready = wait(list(self.open_conns) + list(self.conn_of), timeout=timeout)
            for obj in ready:  # messages first: a worker's last report precedes its exit
                if obj in self.open_conns:
                    self._drain(obj)
            for obj in ready:
                if obj in self.conn_of:
                    self._exited(self.conn_of.pop(obj))
            if self.progress is not None:
                self.progress({"rows": sum(self.produced.values()), "seconds": time.monotonic() - self.start})
        if self.store is not None:  # every worker is done: none writes into an abandoned one
            self.store.discard_incomplete()
        dropped: dict[str, int] = {}
        for s in self.stats:
            if s.dropped:
                dropped[s.name] = dropped.get(s.name, 0) + s.dropped
        order = list(self.nodes)
        self.stats.sort(key=lambda s: (order.index(s.name), s.instance))
        collected = {name: [batch for _, batch in batches] for name, batches in self.kept.items()}
        return JobResult(collected, self.stats, time.monotonic() - self.start, dropped, self.completed)

    # ---- checkpoints ------------------------------------------------------------------------

    def _broadcast(self, message: tuple, sources_only: bool = False) -> None:
        for conn, (name, _, _) in self.workers.items():
            if conn in self.open_conns and (self.nodes[name].is_source or not sources_only):
                try:
                    conn.send(message)
                except OSError:  # it just died: its sentinel reports that next
                    pass

    def _maybe_trigger(self) -> None:
        """Asks every source to inject BARRIER(n) after its current batch."""
        now = time.monotonic()
        if self.pending is not None or self.draining or now < self.next_trigger:
            return
        n = self.next_id
        self.next_id += 1
        self.pending = {"id": n, "started": now, "states": {}, "alignment_s": 0.0, "snapshot_s": 0.0, "failed": []}
        self._broadcast(("checkpoint", n), sources_only=True)

    def _acked(self, name: str, instance: int, message: tuple) -> None:
        _, n, state_file, alignment_s, snapshot_s, error = message
        pending = self.pending
        if pending is None or pending["id"] != n:
            return  # an abandoned checkpoint
        if error:
            pending["failed"].append(error)
        else:
            pending["states"][f"{name}-{instance}"] = state_file
        pending["alignment_s"] = max(pending["alignment_s"], alignment_s)
        pending["snapshot_s"] = max(pending["snapshot_s"], snapshot_s)
        if len(pending["states"]) + len(pending["failed"]) < len(self.workers):
            return
        self.pending = None
        self.next_trigger = time.monotonic() + self.config.interval
        try:
            if pending["failed"]:
                raise CheckpointError("; ".join(pending["failed"]))
            stats = {"id": n, "duration_s": round(time.monotonic() - pending["started"], 6),
                     "alignment_s": round(pending["alignment_s"], 6), "snapshot_s": round(pending["snapshot_s"], 6),
                     "bytes": sum(f.bytes for f in pending["states"].values())}
            self.store.commit(n, pending["states"], stats)
            self.completed.append(stats)
            self._broadcast(("committed", n))
        except CheckpointError as exc:
            self.store.discard(n)
            self.failures += 1
            if self.failures > self.config.tolerable_failures:
                raise CheckpointError(f"{self.failures} checkpoints failed, more than the {self.config.tolerable_failures} "
                                      f"tolerated; the last: {exc}") from exc
            warnings.warn(f"checkpoint {n} failed and was discarded; the job goes on: {exc}", stacklevel=2)

    def _abandon(self) -> None:
        self.draining = True
        if self.pending is not None:
            self.store.discard(self.pending["id"])
            self.pending = None

    def _drain(self, conn: Connection) -> None:
        while conn in self.open_conns and conn.poll():
            try:
                message = conn.recv()
            except (EOFError, OSError):  # closed, or reset by a killed worker with unread input
                del self.open_conns[conn]
                return
            self._handle(conn, message)

    def _handle(self, conn: Connection, message: tuple) -> None:
        name, instance, process = self.workers[conn]
        kind = message[0]
        if kind == "ready":
            self.not_ready -= 1
            if self.not_ready == 0:  # every worker attached: the names are no longer needed
                for chan in self.channels.values():
                    chan.close()
                self.running(time.monotonic())
        elif kind == "collect":
            self.kept[name].append((message[2], message[1]))
        elif kind == "progress":
            self.produced[(name, instance)] = message[1]
        elif kind == "ack":
            self._acked(name, instance, message)
        elif kind == "done":
            self.stats.append(message[1])
            self.finished.add((name, instance))
            if self.store is not None:
                self._abandon()  # a finishing job cannot align a barrier any more
        elif kind == "error":
            raise OperatorError(f"operator {name!r} instance {instance} failed: {message[1]}\n"
                                f"--- traceback in the worker (pid {process.pid}) ---\n{message[2]}")

    def _exited(self, conn: Connection) -> None:
        name, instance, process = self.workers[conn]
        process.join()
        self._drain(conn)
        if (name, instance) not in self.finished:
            code = process.exitcode
            how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}")
            raise WorkerDiedError(f"operator {name!r} instance {instance} (pid {process.pid}) {how} before "
                                  f"finishing; the job was stopped and its other workers killed")


# ---- the worker -----------------------------------------------------------------------------

class _Worker:
    def __init__(self, node: Node, instance: int, wiring: dict, names: dict[str, str], conn: Connection,
                 checkpoints: CheckpointConfig | None, restore: int | None) -> None:
        self.node, self.instance, self.conn = node, instance, conn
        self.store = CheckpointStore(checkpoints.directory) if checkpoints else None
        self.aligned = checkpoints is None or checkpoints.exactly_once
        self._sending = threading.Lock()  # the snapshot writer sends acks from its thread
        self._writer = ThreadPoolExecutor(1, "snapshot-writer") if checkpoints else None
        self.restore = restore  # the id of the checkpoint to start from, if any
        self.epoch = restore or 0  # the last barrier this instance passed
        self.start_offset = 0
        self.stats = InstanceStats(node.name, instance)
        readers = [ChannelReader(names[label]) for label in wiring["inputs"]]
        self.gate = InputGate(readers) if readers else None
        self.outputs = [
            _Output([ChannelWriter(names[label]) for label in labels],
                    None if partitioner is None else partitioner(), drop, None if combiner is None else combiner())
            for labels, partitioner, drop, combiner in wiring["outputs"]]
        self.ctx = ops.Context(node.name, instance, node.parallelism)
        self.op = node.make()

    def _batches(self, out: ops.Output) -> list[Batch]:
        """An operator's output as batches: a Batch, a mapping of columns, or an iterable of those."""
        items = [out] if isinstance(out, (Batch, Mapping)) else out
        try:
            return [b if isinstance(b, Batch) else Batch(b) for b in items]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"operator {self.node.name!r} returned {type(out).__name__}: return a Batch, a "
                            f"mapping of columns, an iterable of those, or None ({exc})") from exc

    def emit(self, out: ops.Output) -> None:
        if out is None:
            return
        for batch in self._batches(out):
            if batch.num_rows == 0:
                continue
            self.stats.records_out += batch.num_rows
            self.stats.batches_out += 1
            if self.node.collect:
                self._send(("collect", batch, self.epoch))  # pickling copies it off the ring
            for output in self.outputs:
                self._route(output, batch if output.combiner is None else output.combiner.add(batch))

    def _route(self, output: _Output, batch: Batch | None) -> None:
        if batch is None:
            return
        n = len(output.writers)
        ids = 0 if output.partitioner is None else output.partitioner.assign(batch, n)
        for writer, part in zip(output.writers, split(batch, ids, n)):
            if part is not None:
                self._write(output, writer, part)

    def _flush(self) -> None:
        """Hands on what the combiners hold: at a barrier, when due without input, at the end."""
        for output in self.outputs:
            if output.combiner is not None:
                self._route(output, output.combiner.flush())

    def _write(self, output: _Output, writer: ChannelWriter, part: Batch) -> None:
        try:
            if output.drop:
                try:
                    writer.write(part, timeout=0)
                except ChannelTimeoutError:
                    self.stats.dropped += part.num_rows
                    return
            else:
                writer.write(part)
        except RecordTooLargeError:  # more than half the ring: send it in halves, in order
            if part.num_rows < 2:
                raise
            half = part.num_rows // 2
            self._write(output, writer, part.slice(0, half))
            self._write(output, writer, part.slice(half, part.num_rows))
            return
        self.stats.bytes_out += part.nbytes

    def _restore(self) -> None:
        """Puts back this instance's state of the checkpoint to restore: its own, or, for a
        rescalable (keyed) operator at a new parallelism (or behind a salted edge), the states
        of every old instance to pick its key groups from."""
        store, n, name = self.store, self.restore, self.node.name
        old = sorted((k for k in store.metadata(n)["states"] if k.rsplit("-", 1)[0] == name),
                     key=lambda k: int(k.rsplit("-", 1)[1]))
        if getattr(self.op, "rescalable", False):
            if len(old) == self.node.parallelism and self.op.keyed_input:
                old = [f"{name}-{self.instance}"]  # its key groups are exactly its own state's
            self.op.restore([store.read_state(n, k)["operator"] for k in old])
            return
        if len(old) != self.node.parallelism:
            states = [store.read_state(n, k) for k in old]
            if all(st["operator"] is None and st["offset"] is None for st in states):
                return  # stateless: any parallelism will do
            raise CheckpointError(f"operator {name!r} had parallelism {len(old)} in checkpoint {n} and has "
                                  f"{self.node.parallelism} now: only keyed operators (and stateless ones) "
                                  f"can change it on restore; run it with parallelism {len(old)}")
        state = store.read_state(n, f"{name}-{self.instance}")
        self.op.restore(state["operator"])
        self.start_offset = state["offset"] or 0

    def run(self) -> None:
        self.op.open(self.ctx)
        if self.restore is not None:
            self._restore()
        self._send(("ready",))
        started = time.perf_counter()
        if self.gate is None:
            self._run_source()
        else:
            self._run_operator()
        self.emit(self.op.close())
        self._flush()
        self.stats.backpressured_s = sum(w.stats()["wait_ns"] for o in self.outputs for w in o.writers) / 1e9
        for output in self.outputs:
            for writer in output.writers:
                writer.close()
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # acks before "done"
        total = time.perf_counter() - started
        self.stats.busy_s = max(0.0, total - self.stats.idle_s - self.stats.backpressured_s)
        self._send(("done", self.stats))

    def _send(self, message: tuple) -> None:
        with self._sending:
            self.conn.send(message)

    def _checkpoint(self, n: int, alignment_s: float, offset: int | None = None) -> None:
        """Snapshots the operator (and a source's offset) in memory, forwards BARRIER(n) at
        once, and leaves pickling, writing and the acknowledgement to the writer thread: the
        pipeline pauses only for the in-memory copy (``snapshot()`` returns owned data)."""
        started = time.perf_counter()
        self.epoch = n
        state = {"operator": self.op.snapshot(), "offset": offset}
        self._flush()  # the combined rows belong to this epoch: they go before the barrier
        pause = time.perf_counter() - started
        for output in self.outputs:
            for writer in output.writers:
                writer.write_barrier(n)
        self._writer.submit(self._persist, n, state, alignment_s, pause)

    def _persist(self, n: int, state: dict, alignment_s: float, pause: float) -> None:
        state_file, error = None, None
        try:
            state_file = self.store.write_state(n, self.node.name, self.instance, state)
        except Exception as exc:  # noqa: BLE001 - a failed checkpoint, reported, not a failed job
            error = f"operator {self.node.name!r} instance {self.instance}: {exc}"
        self._send(("ack", n, state_file, alignment_s, pause, error))

    def _control(self, offset: int | None = None) -> None:
        """Handles the coordinator's messages: ("checkpoint", n) for a source, ("committed", n)."""
        while self.conn.poll():
            kind, n = self.conn.recv()
            if kind == "checkpoint":
                self._checkpoint(n, 0.0, offset)
            else:
                self.op.notify_checkpoint_complete(n)

    def _run_source(self) -> None:
        offset, last_report = self.start_offset, time.monotonic()
        while True:
            if self.store is not None:
                self._control(offset)  # between batches: a barrier goes after a whole batch
            batch = self.op.read(offset)
            if batch is None:
                break
            self.stats.records_in += batch.num_rows
            self.stats.batches_in += 1
            self.emit(batch)
            offset += 1
            if time.monotonic() - last_report > _PROGRESS_INTERVAL_S:
                self._send(("progress", self.stats.records_in))
                last_report = time.monotonic()
        self._send(("progress", self.stats.records_in))

    def _run_operator(self) -> None:
        """Reads all inputs fairly. BARRIER(n) aligns: a channel that delivered it is not read
        again until every live channel has (exactly once; at-least-once reads on); then the
        operator snapshots and forwards it."""
        gate, stats, op = self.gate, self.stats, self.op
        aligning: int | None = None
        aligned_at = 0.0
        arrived: set[int] = set()
        notified = self.store is not None and type(op).notify_checkpoint_complete is not ops.Operator.notify_checkpoint_complete
        combiners = [o.combiner for o in self.outputs if o.combiner is not None]
        while True:
            if notified:
                self._control()
            finished = gate.done
            if aligning is not None and set(gate.live) <= arrived:
                self._checkpoint(aligning, time.perf_counter() - aligned_at)
                aligning = None
                arrived.clear()
                gate.unblock_all()
            if finished:
                return
            waited = time.perf_counter()
            due = min((c.due for c in combiners if c.due is not None), default=None)
            try:  # rows held in a combiner go on by their due time, input or not
                channel, record = gate.read(None if due is None else max(0.0, due - time.monotonic()))
            except ChannelTimeoutError:
                self._flush()
                continue
            finally:
                stats.idle_s += time.perf_counter() - waited
            with record:
                if record.kind is RecordKind.DATA:
                    stats.records_in += record.batch.num_rows
                    stats.batches_in += 1
                    self.emit(op.process(record.batch))
                elif record.kind is RecordKind.BARRIER:
                    if aligning is None:
                        aligning, aligned_at = record.value, time.perf_counter()
                    arrived.add(channel)
                    if self.aligned:
                        gate.block(channel)


def _worker_main(node: Node, instance: int, wiring: dict, names: dict[str, str], conn: Connection, parent: int,
                 checkpoints: CheckpointConfig | None, restore: int | None) -> None:
    _prepare_worker_process(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    worker = None
    try:
        worker = _Worker(node, instance, wiring, names, conn, checkpoints, restore)
        worker.run()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator, which raises
        report = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        try:  # through the worker's lock: its snapshot writer may be sending an ack
            worker._send(report) if worker is not None else conn.send(report)
        finally:
            code = 1
    conn.close()
    os._exit(code)  # no atexit handlers or finalizers inherited from the coordinator
