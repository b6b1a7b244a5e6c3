"""The coordinator: runs a job graph with one OS process per task, supervises it, restarts it
from its last checkpoint after a failure, and stops it on request.

An **attempt** creates a channel for every (producing task, consuming task) pair, forks the
tasks, and unlinks every segment as soon as all tasks have attached, so nothing is left in
/dev/shm whatever happens next; tasks die with the coordinator (``PR_SET_PDEATHSIG``). It then
sleeps on the tasks' control pipes, their process sentinels and a wake-up pipe (stop and
checkpoint requests), with a timeout set by the next checkpoint or sample of the counters
(four times a second): it uses next to no CPU while it waits. Collected batches, acknowledgements and statistics arrive on the pipes;
so do failures. On a failure it SIGKILLs the remaining tasks and raises an error naming the
operator and instance: :class:`OperatorError` with the worker's traceback for an exception,
:class:`WorkerDiedError` for a process that died (a signal, or an exit without a report).

A **job** owns a counters board (:mod:`mpstream.counters`) that its tasks write and
``mpstream top``, the metrics endpoint (``metrics_port``), progress bars and the job's
timeline read; it is removed when the job ends.

A **job** runs attempts: with checkpoints, a failed attempt is followed by another restored
from the newest valid checkpoint (up to ``restarts`` times); collect sinks keep only what
preceded that checkpoint, so results are exactly once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from . import messages as msg
from .batch import Batch
from .channel import Channel, Doorbells, SharedCounters, check_free_space, sweep_stale_segments
from .checkpoint import CheckpointStore, restore_from
from .checkpoint_coordinator import CheckpointCoordinator
from .counters import FAILED, FINISHED, Board
from .errors import CheckpointError, OperatorError, PlanError, RestoreError, WorkerDiedError
from .metrics import InstanceStats
from .plan import JobGraph, TaskSpec
from .progress import ProgressBars
from .prometheus import MetricsServer
from .result import JobResult
from .task import TaskConfig, task_main
from .timeline import SAMPLE_INTERVAL_S, Timeline

__all__ = ["CheckpointConfig", "Job", "JobHandle", "run", "start"]

#: Held back while the coordinator forks: CPython runs at-fork callbacks (logging registers
#: some) in which an exception, KeyboardInterrupt included, is printed and dropped. Blocked,
#: a Ctrl-C during the forks is delivered right after them instead of being lost.
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints every ``interval`` seconds into ``directory``, keeping the last ``retain``;
    the job fails after more than ``tolerable_failures`` failed checkpoints in a row (e.g. a
    full disk). When a task fails, the job restarts from the newest valid checkpoint, up to
    ``restarts`` times, waiting ``restart_backoff`` (doubling) first. ``resume``: True starts
    from the directory's newest valid checkpoint (an error if there is none), "if-present"
    also starts fresh when there is none. ``exactly_once=False``: barriers are not aligned
    (at-least-once: a restore may replay some records twice). ``unaligned=True``: barriers
    overtake buffered records, which the checkpoint keeps (:mod:`mpstream.barrier`), from the
    start, or with ``aligned_timeout`` once a checkpoint has been aligning that long. A
    checkpoint not complete ``timeout`` seconds after its trigger is discarded as failed."""

    directory: str
    interval: float = 1.0
    retain: int = 3
    tolerable_failures: int = 3
    restarts: int = 3
    restart_backoff: float = 0.1
    resume: bool | str = False
    exactly_once: bool = True
    unaligned: bool = False
    timeout: float = 600.0
    aligned_timeout: float | None = None


class _Cancelled(Exception):
    """JobHandle.cancel(): stop at once, killing every task."""


Progress = bool | Callable[[dict[str, Any]], None] | None


class Job:
    """One run of a job graph: its attempts and their results (see the module doc).
    ``progress``: True draws progress bars (:mod:`mpstream.progress`), a function is called
    with ``{"rows": rows the sources produced, "seconds": since the start}`` four times a
    second. ``metrics_port``: serve the counters to Prometheus (:mod:`mpstream.prometheus`)."""

    def __init__(self, graph: JobGraph, progress: Progress = None, checkpoints: CheckpointConfig | None = None,
                 metrics_port: int | None = None) -> None:
        if not graph.nodes:
            raise PlanError("the pipeline has no operators")
        if metrics_port is not None and (not isinstance(metrics_port, int) or not 0 <= metrics_port < 65536):
            raise PlanError(f"metrics_port must be a TCP port (0 to 65535), got {metrics_port!r}")
        self.graph, self.config, self.metrics_port = graph, checkpoints, metrics_port
        self.progress = progress if callable(progress) else None
        self.want_bars = progress is True
        self.bars: ProgressBars | None = None
        self.store = CheckpointStore(checkpoints.directory, checkpoints.retain) if checkpoints else None
        self._rescalable: dict[str, bool] = {}
        if checkpoints is not None:
            for node in graph.nodes:  # built here only to ask; tasks build their own
                operator = node.make()
                if not getattr(operator, "resumable", True):
                    raise PlanError(f"operator {node.name!r} ({operator!r}) cannot be resumed after a restore, so it "
                                    f"cannot run in a job with checkpoints: for files, write CSV (fmt='csv') or use "
                                    f"to_files(..., transactional=True)")
                self._rescalable[node.name] = operator.rescalable
        self.tasks = graph.tasks()
        self.kept: dict[str, list[tuple[int, Batch]]] = {n.name: [] for n in graph.nodes if n.collect}
        self.arena = msg.BufferArena()  # where collected batches land
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False  # the wake-up pipe is closed: the job ended, requests do nothing
        self._closing = threading.RLock()  # reentrant: a signal handler may run inside close()
        self._requests: set[str] = set()  # "checkpoint", "cancel": for the attempt running
        self.attempt: _Attempt | None = None  # the one running
        self.stop_mode: str | None = None  # "stop" or "drain", asked once: it holds for every attempt after
        self.started = time.monotonic()
        self.board: Board | None = None
        self.metrics: MetricsServer | None = None
        self.timeline = Timeline([n.name for n in graph.nodes], self.started)

    def sample(self, final: bool = False, callbacks: bool = True) -> None:
        """Reads the counters board (at the start, four times a second, and at the end): the
        timeline gets it, and with ``callbacks`` progress bars and the progress function."""
        job = self.board.snapshot()
        self.timeline.add(job, final)
        if not callbacks:
            return
        if self.bars is not None:
            self.bars.update(job)
        if self.progress is not None:
            sources = {n.name for n in self.graph.nodes if n.is_source}
            self.progress({"rows": sum(op.records_in for op in job.operators if op.name in sources),
                           "seconds": time.monotonic() - self.started})

    def request(self, what: str) -> None:
        """Asks the running job for "stop" (with a checkpoint), "drain", "checkpoint" or
        "cancel"; safe from a signal handler or another thread; nothing once the job ended."""
        with self._closing:  # the pipe's descriptors may be another file's once closed
            if self._closed:
                return
            if what in ("stop", "drain"):
                self.stop_mode = "drain" if "drain" in (what, self.stop_mode) else what
            else:
                self._requests.add(what)
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def close(self) -> None:
        with self._closing:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _restore_point(self, first: int = 0) -> int | None:
        """The id of the newest checkpoint from ``first`` on that checks out (damaged newer ones
        are reported): a restart never goes back to an earlier run's checkpoints."""
        checkpoint_id, problems = self.store.latest_valid(first)
        for problem in problems:
            warnings.warn(f"skipping a damaged checkpoint: {problem}", stacklevel=4)
        return checkpoint_id

    def _check_restorable(self, checkpoint_id: int) -> None:
        """Every operator can be restored from the checkpoint at its parallelism now (else a
        CheckpointError saying why and what to do, before anything starts), and the job has
        every operator the checkpoint holds state of: a state left out would be lost silently
        (an operator without state may go)."""
        gone = sorted(self.store.operators(checkpoint_id) - {node.name for node in self.graph.nodes})
        unknown = [name for name in gone if self.store.holds_state(checkpoint_id, name)
                   or self.store.in_flight_rows(checkpoint_id, name)]
        if unknown:
            raise CheckpointError(f"checkpoint {checkpoint_id} holds the state of operators this job does not have: "
                                  f"{', '.join(map(repr, unknown))} (removed or renamed); resume it with the job "
                                  f"that wrote it, or start without resume")
        for node in self.graph.nodes:
            restore_from(self.store, checkpoint_id, node.name, node.parallelism, self._rescalable[node.name],
                         node.partitioning)

    def run(self) -> JobResult:
        _warn_of_fork_unsafe_pools()
        self.board = Board.create(self.graph.name, [t.name for t in self.tasks],
                                  [(op.node.name, op.instance, i) for i, t in enumerate(self.tasks) for op in t.operators])
        with contextlib.ExitStack() as closing:  # each closed whatever the others do
            closing.callback(self.board.close)
            if self.metrics_port is not None:
                self.metrics = MetricsServer(self.metrics_port, self.board.snapshot)
                closing.callback(self.metrics.close)
            if self.want_bars:
                self.bars = ProgressBars({n.name: n.make().total_rows() for n in self.graph.nodes if n.is_source})
                closing.callback(self.bars.close)
            try:
                self.sample()
                result = self._run()
            except BaseException:
                self.board.set(state=FAILED)
                self.sample(final=True, callbacks=False)  # a progress function may be what failed
                raise
            self.board.set(state=FINISHED)
            self.sample(final=True)
            return result

    def _run(self) -> JobResult:
        config = self.config
        restore = None
        if config is not None and config.resume:
            restore = self._restore_point()
            if restore is None and config.resume != "if-present":
                raise CheckpointError(f"resume=True, but no checkpoint was found in {config.directory}: check the "
                                      f"directory, or pass resume='if-present' to start fresh when there is none")
        if self.store is not None:
            if restore is not None:
                self._check_restorable(restore)
            self.store.create()
            self.store.discard_incomplete()  # left by a job that died mid-checkpoint
        # this run's checkpoints: a restart goes back to one of them (or to the one it resumed)
        first = restore if restore is not None else (self.store.complete() or [0])[-1] + 1 if self.store else 0
        restored_from = restore
        started_at = {} if restore is None else {  # where the run's sources start: its own work is after that
            node.name: [self.store.read_state(restore, node.name, i).operator
                        for i in range(self.store.instances(restore, node.name))]
            for node in self.graph.nodes if node.is_source}
        recoveries: list[float] = []  # failure detected -> every task restored and running again
        failed_at: list[float] = []
        running_at: list[float] = []

        def running(at: float) -> None:
            running_at.append(at)
            if len(failed_at) > len(recoveries):
                recoveries.append(at - failed_at[-1])

        while True:
            try:
                self.attempt = _Attempt(self, restore, running)
                result = self.attempt.run()
                result.recovery_seconds, result.running_at = recoveries, running_at
                result.restored_from, result.started_at = restored_from, started_at
                result.recording = self.timeline
                return result
            except (WorkerDiedError, OperatorError) as exc:
                if config is None or len(failed_at) >= config.restarts or isinstance(exc, RestoreError):
                    raise
                if len(failed_at) > len(recoveries):  # the restarted attempt failed before running
                    recoveries.append(time.monotonic() - failed_at[-1])
                failed_at.append(time.monotonic())
                self.board.set(restarts=len(failed_at), restarted_at=time.time_ns())
                self.timeline.restarts.append(round(time.monotonic() - self.started, 3))
                warnings.warn(f"restarting the job from its last checkpoint after: {exc}", stacklevel=3)
                time.sleep(config.restart_backoff * 2 ** (len(failed_at) - 1))  # backoff, not synchronisation
                restore = self._restore_point(first)
                upto = restore or 0
                for batches in self.kept.values():  # what followed the checkpoint will be replayed
                    batches[:] = [(epoch, b) for epoch, b in batches if epoch < upto]


#: Thread names of the pools known not to survive a fork, and whose they are: a worker forked
#: while one runs finds the pool's threads gone and waits on them for ever. (polars starts its
#: compute pool, threads "polars-0", "polars-1"..., at its first query, not at its import.)
_FORK_UNSAFE_POOLS = {re.compile(r"polars-\d+"): "polars"}


def _warn_of_fork_unsafe_pools() -> None:
    """Warns (RuntimeWarning) when this process runs a thread pool of _FORK_UNSAFE_POOLS: the
    workers about to be forked hang if an operator calls that library."""
    try:
        names = {Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task")}
    except OSError:  # no /proc (or a thread gone meanwhile): nothing to say
        return
    for pool, library in _FORK_UNSAFE_POOLS.items():
        if any(pool.fullmatch(name) for name in names):
            warnings.warn(f"{library} has run in this process and its thread pool does not survive a fork: an "
                          f"operator that calls {library} hangs in mpstream's forked workers. Use {library} "
                          f"either here or in operators, not both (or start the job before {library} runs "
                          f"here)", RuntimeWarning, stacklevel=5)


def _widen(*conns: Connection) -> None:
    """Asks for 4 MiB socket buffers (the kernel caps them at net.core.[rw]mem_max): a collect
    sink's batches then go out without waiting for the coordinator to read each 200 KiB."""
    for conn in conns:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)


@dataclass
class _TaskProcess:
    spec: TaskSpec
    process: Any  # multiprocessing.Process
    conn: Connection


class _Attempt:
    """One attempt of a job: its channels and task processes, and the coordinator's loop."""

    def __init__(self, job: Job, restore: int | None, running: Callable[[float], None]) -> None:
        self.job, self.restore, self.running = job, restore, running
        self.by_name: dict[str, _TaskProcess] = {}
        self.by_conn: dict[Connection, _TaskProcess] = {}
        self.by_sentinel: dict[int, _TaskProcess] = {}
        self.not_ready = len(job.tasks)
        self.commits = False  # a task runs a two-phase-commit operator
        self.finished: dict[str, tuple[InstanceStats, ...]] = {}
        self.channels: dict[str, Channel] = {}
        self.doorbells: Doorbells | None = None
        self.slots: dict[str, int] = {}  # task -> its doorbell
        config = job.config
        self.checkpoints = None if config is None else CheckpointCoordinator(
            job.store, config.interval, config.tolerable_failures, self._send,
            {t.name for t in job.tasks if t.is_source}, {t.name for t in job.tasks}, lambda: self.commits,
            config.unaligned, config.timeout, config.aligned_timeout)
        self.stopped = False  # Finish went out
        self.stop_applied: str | None = None

    def run(self) -> JobResult:
        sweep_stale_segments()
        job = self.job
        context = multiprocessing.get_context("fork")  # tasks inherit the user's functions, lambdas too
        for node in job.graph.nodes:
            if node.prepare is not None:
                node.prepare()
        try:
            self.doorbells = Doorbells("doorbells", len(job.tasks))
            config = TaskConfig(None if job.config is None else job.config.directory,
                                job.config is None or job.config.exactly_once, self.restore, self.doorbells.name,
                                job.board.path, SharedCounters([node.name for node in job.graph.nodes]))
            labels, capacity = job.graph.channels(), job.graph.channel_capacity
            check_free_space(f"job {job.graph.name!r} ({len(labels)} channels)",  # each reserves as it fills
                             len(labels) * Channel.segment_length(capacity))
            for label in labels:
                self.channels[label] = Channel(label, capacity, check_space=False)
            names = {label: chan.name for label, chan in self.channels.items()}
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
            try:
                self._fork(context, names, config)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            return self._supervise()
        finally:
            if self.checkpoints is not None:
                self.checkpoints.abandon()
            for task in self.by_name.values():
                if task.process.is_alive():
                    task.process.kill()
                task.process.join()
                task.conn.close()
                self.job.board.end_task(self.slots[task.spec.name])
            if self.job.store is not None:  # a failed or timed-out checkpoint's files, written late
                self.job.store.discard_incomplete()
            self._unlink()

    def _unlink(self) -> None:
        """Unlinks every segment name (tasks attached keep their mappings)."""
        for chan in self.channels.values():
            chan.close()
        if self.doorbells is not None:
            self.doorbells.close()

    def _fork(self, context: Any, names: dict[str, str], config: TaskConfig) -> None:
        for slot, spec in enumerate(self.job.tasks):
            self.slots[spec.name] = slot
            ours, theirs = context.Pipe()
            if any(op.node.collect for op in spec.operators):
                _widen(ours, theirs)
            process = context.Process(target=task_main, name=f"mpstream:{spec.name}",
                                      args=(spec, slot, names, theirs, os.getpid(), config), daemon=True)
            process.start()
            theirs.close()
            task = _TaskProcess(spec, process, ours)
            self.by_name[spec.name] = self.by_conn[ours] = self.by_sentinel[process.sentinel] = task

    # ---- the loop -------------------------------------------------------------------------

    def _supervise(self) -> JobResult:
        job = self.job
        open_conns = dict(self.by_conn)
        sentinels = dict(self.by_sentinel)
        next_sample = time.monotonic() + SAMPLE_INTERVAL_S
        while len(self.finished) < len(self.by_name):
            self._requests()
            if self.checkpoints is not None:
                self.checkpoints.poll()
                if self.checkpoints.done and not self.stopped:
                    self.stopped = True
                    for name in reversed(list(self.by_name)):  # downstream first: it stops reading first
                        self._send(name, msg.Finish())
            deadline = next_sample
            if self.checkpoints is not None:
                deadline = min(deadline, self.checkpoints.deadline)
            timeout = None if deadline == float("inf") else min(max(0.0, deadline - time.monotonic()), 3600.0)
            ready = wait(list(open_conns) + list(sentinels) + [job._wake_r], timeout=timeout)
            for obj in ready:  # messages first: a task's last report precedes its exit
                if obj in open_conns:
                    self._drain(obj, open_conns)
            for obj in ready:
                if obj in sentinels:
                    self._exited(sentinels.pop(obj), open_conns)
            if time.monotonic() >= next_sample:
                job.sample()
                next_sample = time.monotonic() + SAMPLE_INTERVAL_S
        return self._result()

    def _requests(self) -> None:
        """Acts on stop, drain, checkpoint and cancel requests (signals, a JobHandle)."""
        job = self.job
        try:
            os.read(job._wake_r, 4096)
        except BlockingIOError:
            pass
        requests = set()
        while job._requests:  # pop by pop: a signal handler may add one between any two bytecodes
            requests.add(job._requests.pop())
        if "cancel" in requests:
            raise _Cancelled()
        checkpoints = self.checkpoints
        if job.stop_mode is not None and self.stop_applied != job.stop_mode:
            self.stop_applied = job.stop_mode
            if job.stop_mode == "drain" or checkpoints is None:
                for task in self.by_name.values():  # the sources end their input here
                    if task.spec.is_source:
                        self._send(task.spec.name, msg.EndInput())
            else:
                checkpoints.request_stop()
        if "checkpoint" in requests and checkpoints is not None:
            checkpoints.demand()

    def _send(self, task: str, message: Any) -> None:
        """Sends a message and rings the task's doorbell: a parked task wakes for it."""
        try:
            self.by_name[task].conn.send(message)
        except OSError:  # it just died: its sentinel reports that next
            return
        self.doorbells.ring(self.slots[task])

    def _drain(self, conn: Connection, open_conns: dict) -> None:
        while conn in open_conns and conn.poll():
            try:
                message = msg.receive(conn, self.job.arena)
            except (EOFError, OSError):  # closed, or reset by a killed task with unread input
                del open_conns[conn]
                return
            self._handle(self.by_conn[conn], message)

    def _handle(self, task: _TaskProcess, message: Any) -> None:
        name = task.spec.name
        checkpoints = self.checkpoints
        if isinstance(message, msg.Collected):
            self.job.kept[message.sink] += [(message.epoch, batch) for batch in message.batches]
        elif isinstance(message, (msg.AcknowledgeCheckpoint, msg.DeclineCheckpoint)):
            completed = len(checkpoints.completed)
            if isinstance(message, msg.AcknowledgeCheckpoint):
                checkpoints.on_acknowledge(name, message)
            else:
                checkpoints.on_decline(name, message)
            if len(checkpoints.completed) > completed:
                last, marks = checkpoints.completed[-1], self.job.timeline.checkpoints  # of every attempt
                marks.append(round(time.monotonic() - self.job.started, 3))
                self.job.board.set(checkpoints=len(marks), checkpoint_id=last["id"], checkpoint_at=time.time_ns(),
                                   checkpoint_ns=int(last["duration_s"] * 1e9))
        elif isinstance(message, msg.TaskDrained):
            if checkpoints is not None:
                checkpoints.on_drained(name)
        elif isinstance(message, msg.TaskFinished):
            self.finished[name] = message.stats
        elif isinstance(message, msg.TaskReady):
            self.commits |= message.commits_on_checkpoint
            self.not_ready -= 1
            if self.not_ready == 0:  # every task attached: the names are no longer needed
                self._unlink()
                self.running(time.monotonic())
        elif isinstance(message, msg.TaskFailed):
            error = RestoreError if message.restoring else OperatorError
            during = " restoring its state from the checkpoint" if message.restoring else ""
            raise error(f"operator {message.operator!r} instance {message.instance} failed{during}: {message.error}\n"
                        f"--- traceback in the worker (pid {task.process.pid}) ---\n{message.traceback}")

    def _exited(self, task: _TaskProcess, open_conns: dict) -> None:
        task.process.join()
        self.job.board.end_task(self.slots[task.spec.name])
        self._drain(task.conn, open_conns)
        if task.spec.name not in self.finished:
            code = task.process.exitcode
            how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with code {code}")
            chained = [op.name for op in task.spec.operators[1:]]
            with_chained = f" (with {', '.join(map(repr, chained))} chained in its process)" if chained else ""
            raise WorkerDiedError(f"operator {task.spec.head.name!r}{with_chained} instance {task.spec.instance} (pid "
                                  f"{task.process.pid}) {how} before finishing; the job was stopped and its "
                                  f"other workers killed")

    def _result(self) -> JobResult:
        order = [n.name for n in self.job.graph.nodes]
        stats = sorted((s for group in self.finished.values() for s in group),
                       key=lambda s: (order.index(s.name), s.instance))
        dropped: dict[str, int] = {}
        for s in stats:
            if s.dropped:
                dropped[s.name] = dropped.get(s.name, 0) + s.dropped
        checkpoints = self.checkpoints
        final = None if checkpoints is None else checkpoints.final_checkpoint
        stopped = self.job.stop_mode is not None
        # after a stop, what a sink got behind the stop's barrier is not in its checkpoint: the
        # resumed run makes it again
        upto = final if stopped and final is not None else float("inf")
        collected = {name: [batch for epoch, batch in batches if epoch < upto]
                     for name, batches in self.job.kept.items()}
        return JobResult(collected, stats, time.monotonic() - self.job.started, dropped,
                         [] if checkpoints is None else checkpoints.completed, stopped=stopped,
                         final_checkpoint=final)


# ---- running a job --------------------------------------------------------------------------

def run(graph: JobGraph, progress: Progress = None, checkpoints: CheckpointConfig | None = None,
        metrics_port: int | None = None) -> JobResult:
    """Runs the job in the calling thread until it ends (or is stopped) and returns its result.
    In the main thread, SIGTERM stops it with a checkpoint (see :meth:`JobHandle.stop`) and
    SIGUSR1 asks for a checkpoint now; Ctrl-C (KeyboardInterrupt) kills it at once."""
    job = Job(graph, progress, checkpoints, metrics_port)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        # installed before any task exists: SIGUSR1's default action would end the coordinator
        handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda s, f: job.request("stop")),
                    signal.SIGUSR1: signal.signal(signal.SIGUSR1, lambda s, f: job.request("checkpoint"))}
    try:
        return job.run()
    finally:
        for signum, previous in handlers.items():
            signal.signal(signum, previous)
        job.close()


class JobHandle:
    """A job running in a background thread of this process (from ``Pipeline.start()``).

    >>> import numpy as np
    >>> from mpstream import Pipeline
    >>> p = Pipeline()
    >>> p.from_generator("ticks", lambda i, offset: {"n": np.arange(10)}).collect("out")  # unbounded
    >>> job = p.start()
    >>> job.stop(drain=True)          # no checkpoints: the sources end their input where they are
    >>> job.wait()["out"].num_rows % 10
    0
    """

    def __init__(self, graph: JobGraph, progress: Progress, checkpoints: CheckpointConfig | None,
                 metrics_port: int | None = None) -> None:
        self._job = Job(graph, progress, checkpoints, metrics_port)
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mpstream-coordinator", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._job.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self._error = exc
        finally:
            self._job.close()

    def stop(self, drain: bool = False) -> None:
        """Stops the job with a checkpoint (Flink's stop-with-savepoint): the sources stop
        where they are, a final checkpoint is taken, two-phase-commit sinks publish, and the
        job ends without processing the end of its input; ``resume=True`` goes on from there.
        ``drain=True`` (and any stop of a job without checkpoints) instead ends the sources'
        input where they are: every operator then emits its final output. Once the job has
        ended, this (as :meth:`checkpoint` and :meth:`cancel`) does nothing."""
        self._job.request("drain" if drain else "stop")

    def workers(self) -> dict[str, int]:
        """The pid of every task (by name, e.g. ``"agg[0]"``) of the attempt running now."""
        attempt = self._job.attempt
        return {} if attempt is None else {name: task.process.pid for name, task in list(attempt.by_name.items())}

    @property
    def metrics_url(self) -> str | None:
        """Where the job serves its metrics (``metrics_port``; 0 picks a free port), once it
        started; None without."""
        server = self._job.metrics
        return None if server is None else f"http://127.0.0.1:{server.port}/metrics"

    def checkpoint(self) -> None:
        """Asks for a checkpoint now (as SIGUSR1 does)."""
        self._job.request("checkpoint")

    def cancel(self) -> None:
        """Kills every task at once; :meth:`wait` then raises KeyboardInterrupt."""
        self._job.request("cancel")

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> JobResult:
        """The job's result once it ended (raises what the job raised; TimeoutError after
        ``timeout`` seconds). Ctrl-C while waiting cancels the job."""
        try:
            self._thread.join(timeout)
        except KeyboardInterrupt:
            self.cancel()
            self._thread.join()
            raise
        if self._thread.is_alive():
            raise TimeoutError(f"the job is still running after {timeout} s")
        if isinstance(self._error, _Cancelled):
            raise KeyboardInterrupt("the job was cancelled")
        if self._error is not None:
            raise self._error
        return self._result


def start(graph: JobGraph, progress: Progress = None, checkpoints: CheckpointConfig | None = None,
          metrics_port: int | None = None) -> JobHandle:
    """Starts the job in a background thread and returns its :class:`JobHandle`."""
    return JobHandle(graph, progress, checkpoints, metrics_port)
