"""The pipeline API: named operators over streams of batches, built into a job graph
(:mod:`mpstream.plan`) that the coordinator runs with one OS process per task.

>>> import numpy as np
>>> p = Pipeline()
>>> clicks = p.from_arrays("clicks", {"domain": np.array(["a", "b", "a"]), "bytes": np.array([1, 2, 3])})
>>> (clicks.filter("big", lambda b: b["bytes"] > 0)
...        .key_by("domain").aggregate("per_domain", {"bytes": "sum"}, parallelism=2)
...        .collect("out"))
>>> r = p.run()["out"]
>>> sorted(zip(r["domain"].to_numpy().tolist(), r["bytes_sum"].tolist()))
[('a', 4), ('b', 2)]

Every operator has a stable, user-given name (unique in the pipeline; it keys its state in
checkpoints and names its output files) and a parallelism (default: its input's). Records of
one key keep their order from a source instance to the consumer that gets the key; there is
no order across keys or across source instances. Functions may be lambdas or closures: tasks
are forked from the caller. Arguments are checked here, when the pipeline is built: a bad one
raises :class:`~mpstream.errors.PlanError` (a ValueError) or TypeError naming the operator.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import files, sinks, sources
from .aggregate import parse_spec
from .arrow import pyarrow_or_error
from .batch import Batch
from .coordinator import CheckpointConfig, JobHandle, run, start
from .errors import AggregateError, PartitionError, PlanError
from .redis_streams import RedisStreamSink, RedisStreamSource, redis_or_error
from .operators import Aggregate, Combine, Filter, FlatMap, Map, Operator
from .partition import CustomPartitioner, HashPartitioner, Partitioner, RangePartitioner, RoundRobinPartitioner
from .plan import MAIN, Edge, JobGraph, Node, check_name, check_parallelism
from .result import JobResult
from .watermarks import EventTime
from .windows import WindowAggregate, WindowCombine, WindowProcess, WindowSplit

__all__ = ["Pipeline", "Stream", "KeyedStream", "WindowedStream", "WindowResult"]

DEFAULT_BATCH_SIZE = 65536


class Pipeline:
    """A job under construction. ``run()`` executes it and returns the collected results;
    ``start()`` runs it in the background and returns a handle to stop it.

    channel_capacity is the ring size of every channel (bytes, a power of two): a batch may
    take up to half of it (4 MiB: batches up to 2 MiB, e.g. 64K rows of four 8-byte columns).
    ``name`` is what ``mpstream top`` calls the job."""

    def __init__(self, channel_capacity: int = 1 << 22, name: str = "job") -> None:
        self.graph = JobGraph(channel_capacity, name)

    @property
    def nodes(self) -> list[Node]:
        return self.graph.nodes

    # ---- sources ------------------------------------------------------------------------------

    def source(self, name: str, make: Callable[[], sources.Source], parallelism: int = 1) -> Stream:
        """A source from a :class:`~mpstream.sources.Source` factory, one per instance."""
        node = self.graph.add(Node(check_name(name), check_parallelism(name, parallelism), make))
        return Stream(self, [node])

    def from_arrays(self, name: str, columns: Mapping[str, Any], *, parallelism: int = 1,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> Stream:
        """In-memory columns, read in batches of ``batch_size`` rows. The instances share the
        batches: each takes the next one nobody took when it finished its last (see
        :class:`~mpstream.sources.Units`), so a slower instance reads fewer and all end together;
        the rows of one instance come in their order."""
        batch = Batch(columns)  # validated (and strings encoded) once, here, with a clear error
        return self.source(name, lambda: sources.ColumnsSource(batch, batch_size), parallelism)

    def from_batches(self, name: str, batches: Iterable[Batch | Mapping[str, Any]], *, parallelism: int = 1) -> Stream:
        """In-memory batches (or mappings of columns); instance i of p reads batches i, i + p, ..."""
        checked = []
        for i, batch in enumerate(batches):
            if not isinstance(batch, (Batch, Mapping)):
                raise TypeError(f"operator {name!r}: batch {i} is a {type(batch).__name__}; pass Batch objects or "
                                f"mappings of columns (name -> array)")
            checked.append(batch if isinstance(batch, Batch) else Batch(batch))
        return self.source(name, lambda: sources.BatchesSource(checked), parallelism)

    def from_generator(self, name: str, fn: Callable[[int, int], Batch | Mapping[str, Any] | None], *,
                       parallelism: int = 1) -> Stream:
        """``fn(instance, offset)`` gives batch number offset of an instance (None: the end).
        Deterministic functions make the source replayable from any offset."""
        return self.source(name, lambda: sources.GeneratorSource(fn), parallelism)

    def from_csv(self, name: str, path: str, *, parallelism: int = 1, batch_size: int = DEFAULT_BATCH_SIZE,
                 schema: Mapping[str, Any] | None = None, delimiter: str = ",",
                 newlines_in_values: bool = False) -> Stream:
        """CSV files with a header row: a file, a directory or a glob, split into byte ranges
        over the instances (needs pyarrow; types, nulls and splitting: :mod:`mpstream.files`).
        ``schema``: column -> type, for columns not to infer; ``newlines_in_values``: quoted
        fields may hold line ends (ranges are then cut outside quotes)."""
        return self._files(name, "csv", path, parallelism, batch_size, schema=schema, delimiter=delimiter,
                           newlines_in_values=newlines_in_values)

    def from_parquet(self, name: str, path: str, *, parallelism: int = 1, batch_size: int = DEFAULT_BATCH_SIZE,
                     columns: Sequence[str] | None = None) -> Stream:
        """Parquet files (a file, a directory or a glob), split by row group over the instances
        (needs pyarrow; see :mod:`mpstream.files`). ``columns``: read only these."""
        return self._files(name, "parquet", path, parallelism, batch_size, columns=columns)

    def from_json(self, name: str, path: str, *, parallelism: int = 1, batch_size: int = DEFAULT_BATCH_SIZE,
                  schema: Mapping[str, Any] | None = None) -> Stream:
        """JSON-lines files (one object per line), split into byte ranges over the instances
        (needs pyarrow; see :mod:`mpstream.files`)."""
        return self._files(name, "json", path, parallelism, batch_size, schema=schema)

    def from_arrow_ipc(self, name: str, path: str, *, parallelism: int = 1, batch_size: int = DEFAULT_BATCH_SIZE,
                       columns: Sequence[str] | None = None) -> Stream:
        """Arrow IPC files (the file format, ``.arrow`` / Feather v2), split by record batch
        over the instances, memory-mapped (needs pyarrow; see :mod:`mpstream.files`)."""
        return self._files(name, "arrow", path, parallelism, batch_size, columns=columns)

    def from_redis(self, name: str, url: str, streams: str | Sequence[str], *, parallelism: int = 1,
                   batch_size: int = 10_000, until: str | None = None, schema: Mapping[str, Any] | None = None,
                   id_column: str | None = None, retry_s: float = 30.0) -> Stream:
        """Redis streams read by entry id, spread over the instances, replayable from the
        checkpointed ids; unbounded, or up to each stream's last entry at the start with
        ``until="latest"`` (needs redis-py; see :mod:`mpstream.redis_streams`).

        >>> p = Pipeline()  # doctest: +SKIP
        >>> p.from_redis("src", "redis://localhost:6379/0", ["clicks"], schema={"n": "int64"}).to_redis(  # doctest: +SKIP
        ...     "copy", "redis://localhost:6379/0", "clicks-copy")"""
        redis_or_error(f"operator {name!r} (Redis streams)")
        streams = [streams] if isinstance(streams, str) else list(streams)
        if not streams or not all(isinstance(s, str) and s for s in streams):
            raise PlanError(f"operator {name!r}: streams must be one or more stream names, got {streams!r}")
        if until not in (None, "latest"):
            raise PlanError(f"operator {name!r}: until must be None (unbounded) or 'latest', got {until!r}")
        return self.source(name, lambda: RedisStreamSource(url, streams, batch_size, until, schema, id_column,
                                                           retry_s=retry_s), parallelism)

    def _files(self, name: str, fmt: str, path: str, parallelism: int, batch_size: int, **options: Any) -> Stream:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise PlanError(f"operator {name!r}: batch_size must be an int >= 1, got {batch_size!r}")
        pyarrow_or_error(f"operator {name!r} ({fmt} files)")  # a missing extra or file: an error now, here
        planned = files.FileSource(fmt, path, batch_size, **options).plan()  # here, and again if the files change
        node = self.graph.add(Node(check_name(name), check_parallelism(name, parallelism), lambda: copy.copy(planned),
                                   prepare=planned.refresh))
        return Stream(self, [node])

    def from_numpy(self, name: str, path: str, *, parallelism: int = 1, batch_size: int = DEFAULT_BATCH_SIZE) -> Stream:
        """An .npz archive (one array per column) or a structured .npy array (memory-mapped),
        loaded in each worker; the instances share its batches as ``from_arrays``'s, and each
        converts only the batches it reads."""
        return self.source(name, lambda: sources.ColumnsSource(None, batch_size, lambda: sources.load_numpy(path)),
                           parallelism)

    # ---- running ------------------------------------------------------------------------------

    def _options(self, checkpoint_dir: str | None, checkpoint_interval: float, checkpoint_retain: int,
                 tolerable_checkpoint_failures: int, restarts: int, restart_backoff: float, resume: bool | str,
                 exactly_once: bool, unaligned: bool, timeout: float,
                 aligned_timeout: float | None) -> CheckpointConfig | None:
        if resume not in (False, True, "if-present"):
            raise PlanError(f"resume must be False, True or 'if-present', got {resume!r}")
        if unaligned and not exactly_once:
            raise PlanError("unaligned_checkpoints=True is exactly-once: it cannot go with exactly_once=False")
        if aligned_timeout is not None and not unaligned:
            raise PlanError("aligned_checkpoint_timeout is when checkpoints turn unaligned: it needs "
                            "unaligned_checkpoints=True")
        if aligned_timeout is not None and not aligned_timeout >= 0:
            raise PlanError(f"aligned_checkpoint_timeout must be >= 0 seconds (or None), got {aligned_timeout!r}")
        if checkpoint_dir is None:
            if resume:
                raise PlanError("resume needs a checkpoint_dir to resume from")
            return None
        if not checkpoint_interval > 0:
            raise PlanError(f"checkpoint_interval must be > 0 seconds, got {checkpoint_interval!r}")
        if not timeout > 0:
            raise PlanError(f"checkpoint_timeout must be > 0 seconds, got {timeout!r}")
        if aligned_timeout is not None and not aligned_timeout < timeout:
            raise PlanError(f"aligned_checkpoint_timeout ({aligned_timeout!r} s) must be below checkpoint_timeout "
                            f"({timeout!r} s): a checkpoint would time out before it turned unaligned")
        return CheckpointConfig(checkpoint_dir, checkpoint_interval, checkpoint_retain, tolerable_checkpoint_failures,
                                restarts, restart_backoff, resume, exactly_once, unaligned, timeout, aligned_timeout)

    def run(self, *, progress: bool | Callable[[dict[str, Any]], None] | None = None,
            checkpoint_dir: str | None = None, checkpoint_interval: float = 1.0,
            checkpoint_retain: int = 3, tolerable_checkpoint_failures: int = 3,
            restarts: int = 3, restart_backoff: float = 0.1, resume: bool | str = False,
            exactly_once: bool = True, unaligned_checkpoints: bool = False,
            checkpoint_timeout: float = 600.0, aligned_checkpoint_timeout: float | None = None,
            metrics_port: int | None = None) -> JobResult:
        """Runs the job until its sources end (or it is stopped: SIGTERM) and returns its
        result. ``progress=True`` shows a progress bar per source on a terminal (tqdm, the
        ``progress`` extra); a function ``progress(info)`` is called four times a second with
        the rows the sources produced so far. ``metrics_port``: serve the job's counters to
        Prometheus on 127.0.0.1 (the ``metrics`` extra; :mod:`mpstream.prometheus`). With a ``checkpoint_dir``, aligned checkpoints are taken every
        ``checkpoint_interval`` s (and on SIGUSR1), a failed worker makes the job restart
        from the last one (up to ``restarts`` times), and a bounded job ends with a final
        checkpoint; ``resume=True`` starts from the directory's newest valid checkpoint (an
        error if there is none; ``"if-present"`` starts fresh then). ``exactly_once=False``
        skips barrier alignment: no pause at a checkpoint, but a restore may count some
        records twice (at-least-once). ``unaligned_checkpoints=True`` keeps exactly-once but
        lets barriers overtake the records waiting in the rings, which the checkpoint then
        holds: under backpressure a checkpoint no longer waits for full rings to drain (stop
        checkpoints stay aligned); with ``aligned_checkpoint_timeout`` (seconds) a checkpoint
        starts aligned and turns unaligned only once it has taken that long. A checkpoint not
        complete ``checkpoint_timeout`` s after its trigger is discarded with a warning and
        counts as failed; more than
        ``tolerable_checkpoint_failures`` failed in a row fail the job (``CheckpointError``).
        See :mod:`mpstream.coordinator` and :mod:`mpstream.barrier`."""
        config = self._options(checkpoint_dir, checkpoint_interval, checkpoint_retain, tolerable_checkpoint_failures,
                               restarts, restart_backoff, resume, exactly_once,
                               unaligned_checkpoints, checkpoint_timeout, aligned_checkpoint_timeout)
        return run(self.graph, progress, config, metrics_port)

    def start(self, *, progress: bool | Callable[[dict[str, Any]], None] | None = None,
              checkpoint_dir: str | None = None, checkpoint_interval: float = 1.0,
              checkpoint_retain: int = 3, tolerable_checkpoint_failures: int = 3,
              restarts: int = 3, restart_backoff: float = 0.1, resume: bool | str = False,
              exactly_once: bool = True, unaligned_checkpoints: bool = False,
              checkpoint_timeout: float = 600.0, aligned_checkpoint_timeout: float | None = None,
              metrics_port: int | None = None) -> JobHandle:
        """As :meth:`run`, but in a background thread: returns a
        :class:`~mpstream.coordinator.JobHandle` (``stop()``, ``wait()``). ``run()`` is
        ``start().wait()`` in the calling thread."""
        config = self._options(checkpoint_dir, checkpoint_interval, checkpoint_retain, tolerable_checkpoint_failures,
                               restarts, restart_backoff, resume, exactly_once,
                               unaligned_checkpoints, checkpoint_timeout, aligned_checkpoint_timeout)
        return start(self.graph, progress, config, metrics_port)


class Stream:
    """The output of one or more operators (several after ``union``): of their main output
    port, or of a side output (``ports``, e.g. a window's "late")."""

    def __init__(self, pipeline: Pipeline, upstreams: list[Node], partitioner: Callable[[], Partitioner] | None = None,
                 range_bounds: int | None = None, ports: list[str] | None = None) -> None:
        self.pipeline = pipeline
        self.upstreams = upstreams
        self.ports = ports or [MAIN] * len(upstreams)
        self._partitioner = partitioner
        self._range_bounds = range_bounds  # a range partitioner's bound count, checked at the next operator
        self._partitioning: str | None = None if partitioner is None else "round_robin"  # see Node.partitioning

    @property
    def parallelism(self) -> int:
        return max(n.parallelism for n in self.upstreams)

    def _then(self, name: str, make: Callable[[], Operator], parallelism: int | None,
              backpressure: str = "block", collect: bool = False, chain: bool = False) -> Stream:
        check_name(name)
        if backpressure not in ("block", "drop"):
            raise PlanError(f"operator {name!r}: backpressure must be 'block' or 'drop', got {backpressure!r}")
        parallelism = self.parallelism if parallelism is None else check_parallelism(name, parallelism)
        if self._range_bounds is not None and self._range_bounds != parallelism - 1:
            raise PlanError(f"operator {name!r}: a range partitioner over {parallelism} instances needs "
                            f"{parallelism - 1} range bounds, got {self._range_bounds}")
        edges = []
        for up, port in zip(self.upstreams, self.ports):
            partitioner = self._partitioner
            if partitioner is None and up.parallelism != parallelism:
                partitioner = RoundRobinPartitioner  # no key: rebalance whole batches
            edges.append(Edge(up.name, partitioner, drop=backpressure == "drop", port=port))
        chained = (chain and len(edges) == 1 and edges[0].partitioner is None and not edges[0].drop
                   and self.upstreams[0].parallelism == parallelism)
        node = self.pipeline.graph.add(Node(name, parallelism, make, edges, collect, chained,
                                            partitioning=self._partitioning))
        return Stream(self.pipeline, [node])

    def map(self, name: str, fn: Callable[[Batch], Batch | Mapping[str, Any]], *, parallelism: int | None = None,
            backpressure: str = "block", chain: bool = True) -> Stream:
        """batch -> batch (or a mapping of columns)."""
        return self._then(name, lambda: Map(fn), parallelism, backpressure, chain=chain)

    def filter(self, name: str, fn: Callable[[Batch], np.ndarray], *, parallelism: int | None = None,
               backpressure: str = "block", chain: bool = True) -> Stream:
        """Keeps the rows where ``fn(batch)`` (a bool mask) is true."""
        return self._then(name, lambda: Filter(fn), parallelism, backpressure, chain=chain)

    def flat_map(self, name: str, fn: Callable[[Batch], Iterable[Batch]], *, parallelism: int | None = None,
                 backpressure: str = "block", chain: bool = True) -> Stream:
        """batch -> zero or more batches."""
        return self._then(name, lambda: FlatMap(fn), parallelism, backpressure, chain=chain)

    def process(self, name: str, make: Callable[[], Operator], *, parallelism: int | None = None,
                backpressure: str = "block", chain: bool = True) -> Stream:
        """A user :class:`~mpstream.operators.Operator` (a fresh ``make()`` per instance); after
        ``key_by`` a :class:`~mpstream.operators.KeyedOperator` keeps state per key group."""
        return self._then(name, make, parallelism, backpressure, chain=chain)

    def union(self, *others: Stream) -> Stream:
        """The rows of this stream and others, read fairly by the next operator."""
        return Stream(self.pipeline, self.upstreams + [n for o in others for n in o.upstreams], self._partitioner,
                      self._range_bounds, self.ports + [p for o in others for p in o.ports])

    def with_event_time(self, column: str, *, max_out_of_orderness: int = 0,
                        watermark: Callable[[Batch], int | None] | None = None, idle_timeout: float | None = None,
                        interval: float = 0.2) -> Stream:
        """Declares a source's event time (right after the source): ``column`` holds each
        record's timestamp (int64 in the job's time unit, or datetime64), and every source
        instance makes watermarks from it: ``W = max timestamp seen - max_out_of_orderness``
        after each batch (0: ordered input), or ``watermark(batch)``. With ``idle_timeout``
        (seconds without a record, not counting time blocked on credit) an instance marks
        itself idle, so it holds no window back; ``interval`` is how often it checks. See
        :mod:`mpstream.watermarks`."""
        if len(self.upstreams) != 1 or not self.upstreams[0].is_source or self.ports != [MAIN]:
            raise PlanError("with_event_time() goes right after a source (p.from_...(...).with_event_time(...)): "
                            "watermarks are made where the records enter the job")
        node = self.upstreams[0]
        if not isinstance(max_out_of_orderness, int) or isinstance(max_out_of_orderness, bool) or \
                max_out_of_orderness < 0:
            raise PlanError(f"operator {node.name!r}: max_out_of_orderness must be an int >= 0 (in the event-time "
                            f"unit), got {max_out_of_orderness!r}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise PlanError(f"operator {node.name!r}: idle_timeout must be > 0 seconds, got {idle_timeout!r}")
        if not interval > 0:
            raise PlanError(f"operator {node.name!r}: interval must be > 0 seconds, got {interval!r}")
        node.event_time = EventTime(column, max_out_of_orderness, watermark, idle_timeout, interval)
        return self

    def _event_time_column(self) -> str | None:
        """The event-time column of the sources this stream comes from (None: none declared)."""
        graph, columns, todo, seen = self.pipeline.graph, set(), list(self.upstreams), set()
        while todo:
            node = todo.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.event_time is not None:
                columns.add(node.event_time.column)
            todo += [graph.node(e.upstream) for e in node.inputs]
        if len(columns) > 1:
            raise PlanError(f"the sources of this stream name different event-time columns {sorted(columns)}: "
                            f"rename them to one")
        return columns.pop() if columns else None

    def key_by(self, key: str, partitioner: str | Callable[[Batch, int], np.ndarray] = "hash", *,
               bounds: Sequence[float] | None = None) -> KeyedStream:
        """Partitions the next operator's input by ``key``: "hash" (default: by key group),
        "range" (with sorted ``bounds``, parallelism - 1 of them), "round_robin" (whole batches
        in turn: balance, but a key's rows may go anywhere) or a function ``fn(batch, n) -> ids``."""
        range_bounds = None
        kind = partitioner if isinstance(partitioner, str) else "custom"
        if partitioner == "hash":
            factory: Callable[[], Partitioner] = lambda: HashPartitioner(key)  # noqa: E731
        elif partitioner == "round_robin":
            factory = RoundRobinPartitioner
        elif partitioner == "range":
            if bounds is None:
                raise PlanError(f"a range partitioner on key {key!r} needs bounds")
            try:
                RangePartitioner(key, bounds)  # checks them here
            except PartitionError as exc:
                raise PlanError(str(exc)) from None
            factory = lambda: RangePartitioner(key, bounds)  # noqa: E731
            range_bounds = len(bounds)
        elif callable(partitioner):
            factory = lambda: CustomPartitioner(partitioner)  # noqa: E731
        else:
            raise PlanError(f"partitioner must be 'hash', 'range', 'round_robin' or a function, got {partitioner!r}")
        return KeyedStream(self.pipeline, self.upstreams, factory, key, kind, range_bounds, self.ports)

    def rebalance(self) -> Stream:
        """Round-robin: whole batches in turn to the next operator's instances."""
        return Stream(self.pipeline, self.upstreams, RoundRobinPartitioner, ports=self.ports)

    # ---- sinks --------------------------------------------------------------------------------

    # A sink after a forward edge of equal parallelism runs chained in its upstream's process
    # (as a map does); chain=False gives it a process of its own.

    def collect(self, name: str, *, parallelism: int | None = None, chain: bool = True) -> None:
        """Returns every batch to the caller: ``pipeline.run()[name]`` is their concatenation."""
        self._then(name, sinks.Collect, parallelism, collect=True, chain=chain)

    def to_files(self, name: str, directory: str, fmt: str = "csv", *, transactional: bool = False,
                 max_bytes: int | None = None, partition_by: str | None = None,
                 parallelism: int | None = None, chain: bool = True) -> None:
        """Files in ``directory``. Plain (``fmt`` "csv" or "npz"): one file per instance,
        ``{name}-{instance}.csv`` or ``.npz``; a plain CSV sink resumes its file after a
        restore (each row once), npz files cannot be resumed and are refused in jobs with
        checkpoints. ``transactional=True`` ("csv", "parquet" or "arrow"): exactly-once output
        by two-phase commit, files per instance and checkpoint epoch, published when the
        checkpoint that closes the epoch commits, rolled over every ``max_bytes`` (of the rows
        in memory), in Hive-style ``column=value`` directories with ``partition_by`` (see
        :class:`~mpstream.sinks.TransactionalFileSink`). A file sink keeps its state per
        instance, so a job resumed from a checkpoint must give it the same parallelism."""
        if fmt not in ("csv", "npz", "parquet", "arrow"):
            raise PlanError(f"operator {name!r}: file format must be 'csv', 'npz', 'parquet' or 'arrow', got {fmt!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
            raise PlanError(f"operator {name!r}: max_bytes must be an int >= 1, got {max_bytes!r}")
        if fmt in ("parquet", "arrow"):
            pyarrow_or_error(f"operator {name!r} ({fmt} files)")
            transactional = True
        if transactional:
            if fmt == "npz":
                raise PlanError(f"operator {name!r}: transactional files are CSV, Parquet or Arrow, got fmt='npz'")
            self._then(name, lambda: sinks.TransactionalFileSink(directory, fmt, max_bytes, partition_by), parallelism,
                       chain=chain)
        else:
            if max_bytes is not None or partition_by is not None:
                raise PlanError(f"operator {name!r}: max_bytes and partition_by are for transactional files "
                                f"(transactional=True)")
            self._then(name, lambda: sinks.FileSink(directory, fmt), parallelism, chain=chain)

    def to_parquet(self, name: str, directory: str, *, max_bytes: int | None = None, partition_by: str | None = None,
                   parallelism: int | None = None, chain: bool = True) -> None:
        """Exactly-once Parquet files (``to_files(..., "parquet")``; needs pyarrow)."""
        self.to_files(name, directory, "parquet", max_bytes=max_bytes, partition_by=partition_by,
                      parallelism=parallelism, chain=chain)

    def to_arrow_ipc(self, name: str, directory: str, *, max_bytes: int | None = None,
                     partition_by: str | None = None, parallelism: int | None = None, chain: bool = True) -> None:
        """Exactly-once Arrow IPC files (``to_files(..., "arrow")``; needs pyarrow)."""
        self.to_files(name, directory, "arrow", max_bytes=max_bytes, partition_by=partition_by,
                      parallelism=parallelism, chain=chain)

    def to_redis(self, name: str, url: str, stream: str, *, parallelism: int | None = None,
                 retry_s: float = 30.0, chain: bool = True) -> None:
        """Appends the rows to a Redis stream, exactly once with checkpoints (a transaction at
        each checkpoint's commit; see :mod:`mpstream.redis_streams`; needs redis-py)."""
        redis_or_error(f"operator {name!r} (Redis streams)")
        self._then(name, lambda: RedisStreamSink(url, stream, retry_s), parallelism, chain=chain)

    def to_callback(self, name: str, fn: Callable[[Batch], None], *, parallelism: int | None = None,
                    chain: bool = True) -> None:
        """Calls ``fn(batch)`` in the sink's worker process."""
        self._then(name, lambda: sinks.CallbackSink(fn), parallelism, chain=chain)


class KeyedStream(Stream):
    """A stream partitioned by a key: its next operator gets all rows of a key in one instance."""

    def __init__(self, pipeline: Pipeline, upstreams: list[Node], partitioner: Callable[[], Partitioner], key: str,
                 partitioning: str, range_bounds: int | None = None, ports: list[str] | None = None) -> None:
        super().__init__(pipeline, upstreams, partitioner, range_bounds, ports)
        self.key = key
        self._partitioning = partitioning

    def window(self, assigner: Any, *, allowed_lateness: int = 0) -> WindowedStream:
        """Cuts each key's rows into event-time windows (``mpstream.windows``: ``Tumbling``,
        ``Sliding``, ``Session``, ``Global``); a window fires when the watermark passes its end,
        and rows up to ``allowed_lateness`` (in the event-time unit) after that still update it
        (a late firing)."""
        if not isinstance(allowed_lateness, int) or isinstance(allowed_lateness, bool) or allowed_lateness < 0:
            raise PlanError(f"allowed_lateness must be an int >= 0 (in the event-time unit), got {allowed_lateness!r}")
        return WindowedStream(self, assigner, allowed_lateness)

    def aggregate(self, name: str, spec: Mapping[str, str | Sequence[str]], *, parallelism: int | None = None,
                  salt: int = 0, combiner_delay_s: float = 0.1, emit: str = "final",
                  update_interval: float = 1.0) -> Stream:
        """Per key: ``spec`` maps a column to sum/count/min/max/mean (or a list; "*": "count").
        Result columns: the key, ``{column}_{function}`` and ``count``. A value column whose
        dtype changes between batches widens as numpy would (int and float: float64).

        ``emit="final"``: one row per key when the input ends. ``emit="updates"`` (unbounded
        streams): the rows of the keys that changed, every ``update_interval`` seconds and
        before every checkpoint barrier: an upsert stream (the newest row per key is its
        result so far).

        ``salt=n`` (n > 1) makes it two-stage, for hot keys (Flink's local-global aggregation).
        Each upstream instance first pre-aggregates its rows in a
        :class:`~mpstream.operators.Combine` chained to it, ``{name}.combine`` (one partial row
        per key, handed on at every checkpoint barrier, at the end, when it holds 2^20 keys
        and, with ``emit="updates"``, when its oldest row has waited ``combiner_delay_s``
        seconds: final results come at the end, so nothing is gained by handing them on
        sooner); the partial rows go by key to the final ``name``. A key then reaches the final
        stage at most once per flush of each upstream instance, so a hot key is no hotter
        there than any other: every n > 1 does the same (no further salting spreads a key
        that is already folded). Results equal the unsalted ones (float sums up to rounding:
        another order).
        """
        key = self.key
        try:
            parse_spec(spec)
        except AggregateError as exc:
            raise PlanError(f"operator {name!r}: {exc}") from None
        if not isinstance(salt, int) or isinstance(salt, bool) or salt < 0:
            raise PlanError(f"operator {name!r}: salt must be an int >= 0, got {salt!r}")
        if not (isinstance(combiner_delay_s, (int, float)) and combiner_delay_s >= 0):
            raise PlanError(f"operator {name!r}: combiner_delay_s must be >= 0, got {combiner_delay_s!r}")
        if emit not in ("final", "updates"):
            raise PlanError(f"operator {name!r}: emit must be 'final' or 'updates', got {emit!r}")
        if not (isinstance(update_interval, (int, float)) and update_interval > 0):
            raise PlanError(f"operator {name!r}: update_interval must be > 0 seconds, got {update_interval!r}")
        if parallelism is not None:
            check_parallelism(name, parallelism)
        check_name(name)
        if salt <= 1:
            return self._then(name, lambda: Aggregate(key, spec, "rows", emit, update_interval), parallelism)
        graph = self.pipeline.graph
        combiners = []
        delay = combiner_delay_s if emit == "updates" else math.inf  # final results come at the end: no need to hurry
        for up, port in zip(self.upstreams, self.ports):  # a side output's rows (port), not the main ones
            combine_name = f"{name}.combine" if len(self.upstreams) == 1 else f"{name}.combine.{up.name}"
            combiners.append(graph.add(Node(
                combine_name, up.parallelism, lambda: Combine(key, spec, max_delay_s=delay), [Edge(up.name, port=port)],
                chained=True)))
        final = KeyedStream(self.pipeline, combiners, lambda: HashPartitioner(key), key, "hash")
        return final._then(name, lambda: Aggregate(key, spec, "partials", emit, update_interval), parallelism)


class WindowResult(Stream):
    """The rows a window operator emits; ``late`` is the stream of input rows that came too
    late for all their windows (reading it sends them there instead of counting them)."""

    def __init__(self, pipeline: Pipeline, upstreams: list[Node], late: list[Node]) -> None:
        super().__init__(pipeline, upstreams)
        self._late = late

    @property
    def late(self) -> Stream:
        if not self._late:
            raise PlanError("count windows have no late rows: they never close before the end of the input")
        return Stream(self.pipeline, self._late, ports=["late"] * len(self._late))


class WindowedStream:
    """A keyed stream cut into windows (see :mod:`mpstream.windows`); ``aggregate`` or
    ``process`` them.

    >>> import numpy as np
    >>> from mpstream.windows import Tumbling
    >>> p = Pipeline()
    >>> clicks = p.from_arrays("clicks", {"user": np.array([1, 1, 2, 1]), "ts": np.array([100, 1200, 1500, 900])})
    >>> counts = (clicks.with_event_time("ts", max_out_of_orderness=500).key_by("user")
    ...                 .window(Tumbling(1000)).aggregate("per_second", {"*": "count"}))
    >>> counts.collect("out")
    >>> r = p.run()["out"]
    >>> sorted(zip(r["user"].tolist(), r["window_start"].tolist(), r["count"].tolist()))
    [(1, 0, 2), (1, 1000, 1), (2, 1000, 1)]
    """

    def __init__(self, keyed: KeyedStream, assigner: Any, allowed_lateness: int) -> None:
        self.keyed, self.assigner, self.lateness = keyed, assigner, allowed_lateness
        self.time_column = keyed._event_time_column()
        if assigner.kind != "count" and self.time_column is None:
            raise PlanError("time windows need event time: declare it on the sources, e.g. "
                            "p.from_...(...).with_event_time('ts', max_out_of_orderness=...)")

    def _chained(self, name: str, suffix: str, make: Callable[[Node], Callable[[], Operator]]) -> list[Node]:
        """One node per upstream, chained into its task (where rows meet their watermark)."""
        graph, nodes = self.keyed.pipeline.graph, []
        for up, port in zip(self.keyed.upstreams, self.keyed.ports):
            node_name = f"{name}.{suffix}" if len(self.keyed.upstreams) == 1 else f"{name}.{suffix}.{up.name}"
            nodes.append(graph.add(Node(node_name, up.parallelism, make(up), [Edge(up.name, port=port)], chained=True)))
        return nodes

    def _keyed(self, upstreams: list[Node], name: str, make: Callable[[], Operator], parallelism: int | None,
               partitioner: Callable[[], Partitioner] | None = None, partitioning: str = "hash") -> Node:
        key = self.keyed.key
        stream = KeyedStream(self.keyed.pipeline, upstreams, partitioner or (lambda: HashPartitioner(key)), key,
                             partitioning)
        return stream._then(name, make, parallelism).upstreams[0]

    def aggregate(self, name: str, spec: Mapping[str, str | Sequence[str]], *, parallelism: int | None = None,
                  salt: int = 0, combiner_delay_s: float = 0.1, early_every: int | None = None,
                  early_interval: float | None = None) -> WindowResult:
        """Per key and window, the aggregates of ``spec`` (as ``KeyedStream.aggregate``); output
        rows: the key, ``window_start``, ``window_end``, the aggregates and ``pane``. Early
        firings: every ``early_every`` rows or ``early_interval`` seconds. ``salt=n`` (n > 1)
        makes it two-stage for hot keys: each upstream task pre-aggregates per (key, pane) and
        hands the partials on before every watermark, barrier and ``combiner_delay_s``; a
        partial stage spreads a hot key over n instances; the final stage merges by key. The
        results are the same with and without salt."""
        key, assigner, ts, lateness = self.keyed.key, self.assigner, self.time_column, self.lateness
        check_name(name)
        try:
            parse_spec(spec)
        except AggregateError as exc:
            raise PlanError(f"operator {name!r}: {exc}") from None
        if parallelism is not None:
            check_parallelism(name, parallelism)
        if not isinstance(salt, int) or isinstance(salt, bool) or salt < 0:
            raise PlanError(f"operator {name!r}: salt must be an int >= 0, got {salt!r}")
        if early_every is not None and not (isinstance(early_every, int) and early_every > 0):
            raise PlanError(f"operator {name!r}: early_every must be an int > 0, got {early_every!r}")
        if early_interval is not None and not early_interval > 0:
            raise PlanError(f"operator {name!r}: early_interval must be > 0 seconds, got {early_interval!r}")
        if salt > 1 and assigner.kind == "count":
            raise PlanError(f"operator {name!r}: count windows need every row of a key in order: salt is not "
                            f"supported with them")
        if assigner.kind == "count":
            node = self._keyed(self.keyed.upstreams, name, lambda: WindowAggregate(
                assigner, key, spec, None, 0, "rows", early_every, early_interval), parallelism)
            return WindowResult(self.keyed.pipeline, [node], [])
        if salt > 1:
            first = self._chained(name, "combine", lambda up: lambda: WindowCombine(
                assigner, key, spec, ts, lateness, "rows", combiner_delay_s))
            partial = self._keyed(first, f"{name}.partial", lambda: WindowCombine(
                assigner, key, spec, ts, lateness, "partials", combiner_delay_s), parallelism,
                lambda: HashPartitioner(key, salt), "salted")
            node = self._keyed([partial], name, lambda: WindowAggregate(
                assigner, key, spec, ts, lateness, "partials", early_every, early_interval), parallelism)
            return WindowResult(self.keyed.pipeline, [node], first)
        first = self._chained(name, "split", lambda up: lambda: WindowSplit(assigner, ts, lateness))
        node = self._keyed(first, name, lambda: WindowAggregate(
            assigner, key, spec, ts, lateness, "rows", early_every, early_interval), parallelism)
        return WindowResult(self.keyed.pipeline, [node], first)

    def process(self, name: str, fn: Callable[[Any, Any, Any, Batch], Any], *,
                parallelism: int | None = None) -> WindowResult:
        """Calls ``fn(key, window_start, window_end, rows)`` for each window when it fires (with
        every row so far at a late firing); its output rows get the key, ``window_start``,
        ``window_end`` and ``pane`` in front."""
        key, assigner, ts, lateness = self.keyed.key, self.assigner, self.time_column, self.lateness
        check_name(name)
        if parallelism is not None:
            check_parallelism(name, parallelism)
        if assigner.kind == "count":
            node = self._keyed(self.keyed.upstreams, name, lambda: WindowProcess(assigner, key, fn, None, 0),
                               parallelism)
            return WindowResult(self.keyed.pipeline, [node], [])
        first = self._chained(name, "split", lambda up: lambda: WindowSplit(assigner, ts, lateness))
        node = self._keyed(first, name, lambda: WindowProcess(assigner, key, fn, ts, lateness), parallelism)
        return WindowResult(self.keyed.pipeline, [node], first)
