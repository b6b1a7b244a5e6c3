"""The pipeline API: named operators over streams of batches, built into a plan that
:func:`mpstream.runtime.execute` runs with one OS process per operator instance.

>>> import numpy as np
>>> p = Pipeline()
>>> clicks = p.from_arrays("clicks", {"domain": np.array(["a", "b", "a"]), "bytes": np.array([1, 2, 3])})
>>> (clicks.filter("big", lambda b: b["bytes"] > 0)
...        .key_by("domain").aggregate("per_domain", {"bytes": "sum"}, parallelism=2)
...        .collect("out"))
>>> r = p.run()["out"]
>>> sorted(zip(r["domain"].to_numpy().tolist(), r["bytes_sum"].tolist()))
[('a', 4), ('b', 2)]

Every operator has a stable, user-given name (unique in the pipeline; it will key its state in
checkpoints) and a parallelism (default: its input's). Records of one key keep their order from
a source instance to the consumer that gets the key; there is no order across keys or across
source instances. Functions may be lambdas or closures: workers are forked from the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import operators as ops
from .aggregate import Combiner
from .batch import Batch
from .partition import CustomPartitioner, HashPartitioner, Partitioner, RangePartitioner, RoundRobinPartitioner
from .runtime import CheckpointConfig, JobResult, execute

__all__ = ["Pipeline", "Stream", "KeyedStream", "Node", "Edge"]

DEFAULT_BATCH_SIZE = 65536


@dataclass
class Edge:
    """Rows from every instance of upstream into the node owning this edge, partitioned by a
    fresh ``partitioner()`` per upstream instance; None means forward (instance i to i)."""

    upstream: Node
    partitioner: Callable[[], Partitioner] | None
    drop: bool = False  # backpressure policy: drop (and count) instead of waiting for credit
    combiner: Callable[[], Combiner] | None = None  # one per upstream instance, before partitioning


@dataclass
class Node:
    name: str
    parallelism: int
    make: Callable[[], ops.Operator | ops.Source]
    inputs: list[Edge] = field(default_factory=list)
    collect: bool = False  # a collect sink: its batches return to the caller of run()

    @property
    def is_source(self) -> bool:
        return not self.inputs


class Pipeline:
    """A job under construction. ``run()`` executes it and returns the collected results.

    channel_capacity is the ring size of every channel (bytes, a power of two): a batch may
    take up to half of it (4 MiB: batches up to 2 MiB, e.g. 64K rows of four 8-byte columns)."""

    def __init__(self, channel_capacity: int = 1 << 22) -> None:
        self.nodes: list[Node] = []
        self.channel_capacity = channel_capacity

    def _add(self, node: Node) -> Node:
        if any(n.name == node.name for n in self.nodes):
            raise ValueError(f"operator name {node.name!r} is used twice; every operator needs its own name")
        if node.parallelism < 1:
            raise ValueError(f"operator {node.name!r}: parallelism must be >= 1, got {node.parallelism}")
        self.nodes.append(node)
        return node

    # ---- sources ------------------------------------------------------------------------------

    def source(self, name: str, make: Callable[[], ops.Source], parallelism: int = 1) -> Stream:
        """A source from a :class:`~mpstream.operators.Source` factory, one per instance."""
        return Stream(self, [self._add(Node(name, parallelism, make))], None)

    def from_arrays(self, name: str, columns: Mapping[str, Any], *, parallelism: int = 1,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> Stream:
        """In-memory columns; instance i of p reads the i-th contiguous share of the rows."""
        Batch(columns)  # validate here, in the caller, with a clear error
        return self.source(name, lambda: ops.ColumnsSource(columns, batch_size), parallelism)

    def from_batches(self, name: str, batches: Sequence[Batch], *, parallelism: int = 1) -> Stream:
        """In-memory batches; instance i of p reads batches i, i + p, ..."""
        batches = list(batches)
        return self.source(name, lambda: ops.BatchesSource(batches), parallelism)

    def from_generator(self, name: str, fn: Callable[[int, int], Batch | Mapping[str, Any] | None], *,
                       parallelism: int = 1) -> Stream:
        """``fn(instance, offset)`` gives batch number offset of an instance (None: the end).
        Deterministic functions make the source replayable from any offset."""
        return self.source(name, lambda: ops.GeneratorSource(fn), parallelism)

    def from_csv(self, name: str, path: str, *, parallelism: int = 1, batch_size: int = DEFAULT_BATCH_SIZE) -> Stream:
        """A CSV file with a header row (columns typed int, else float, else str)."""
        return self.source(name, lambda: ops.ColumnsSource(None, batch_size, lambda: ops.load_csv(path)), parallelism)

    def from_numpy(self, name: str, path: str, *, parallelism: int = 1, batch_size: int = DEFAULT_BATCH_SIZE) -> Stream:
        """An .npz archive (one array per column) or a structured .npy array."""
        return self.source(name, lambda: ops.ColumnsSource(None, batch_size, lambda: ops.load_numpy(path)), parallelism)

    def run(self, *, progress: Callable[[dict[str, Any]], None] | None = None,
            checkpoint_dir: str | None = None, checkpoint_interval: float = 1.0,
            checkpoint_retain: int = 3, tolerable_checkpoint_failures: int = 3,
            restarts: int = 3, restart_backoff: float = 0.1, resume: bool = False,
            exactly_once: bool = True) -> JobResult:
        """Runs the job to completion; see :func:`mpstream.runtime.execute`. With a
        ``checkpoint_dir``, aligned checkpoints are taken every ``checkpoint_interval`` s and
        a failed worker makes the job restart from the last one (up to ``restarts`` times);
        ``resume=True`` starts from the directory's newest valid checkpoint (a job whose
        whole process tree died). ``exactly_once=False`` skips barrier alignment: no pause at
        a checkpoint, but a restore may count some records twice (at-least-once)."""
        config = None
        if checkpoint_dir is not None:
            config = CheckpointConfig(checkpoint_dir, checkpoint_interval, checkpoint_retain,
                                      tolerable_checkpoint_failures, restarts, restart_backoff, resume,
                                      exactly_once)
        return execute(self, progress=progress, checkpoints=config)


class Stream:
    """The output of one or more operators (several after ``union``)."""

    def __init__(self, pipeline: Pipeline, upstreams: list[Node], partitioner: Callable[[], Partitioner] | None) -> None:
        self.pipeline = pipeline
        self.upstreams = upstreams
        self._partitioner = partitioner

    @property
    def parallelism(self) -> int:
        return max(n.parallelism for n in self.upstreams)

    def _then(self, name: str, make: Callable[[], ops.Operator], parallelism: int | None,
              backpressure: str = "block", partitioner: Callable[[], Partitioner] | None = None,
              collect: bool = False, combiner: Callable[[], Combiner] | None = None) -> Stream:
        if backpressure not in ("block", "drop"):
            raise ValueError(f"operator {name!r}: backpressure must be 'block' or 'drop', got {backpressure!r}")
        parallelism = parallelism or self.parallelism
        part = partitioner or self._partitioner
        edges = []
        for up in self.upstreams:
            edge_part = part
            if edge_part is None and up.parallelism != parallelism:
                edge_part = RoundRobinPartitioner  # no key: rebalance whole batches
            edges.append(Edge(up, edge_part, drop=backpressure == "drop", combiner=combiner))
        node = self.pipeline._add(Node(name, parallelism, make, edges, collect))
        return Stream(self.pipeline, [node], None)

    def map(self, name: str, fn: Callable[[Batch], Batch | Mapping[str, Any]], *, parallelism: int | None = None,
            backpressure: str = "block") -> Stream:
        """batch -> batch (or a mapping of columns)."""
        return self._then(name, lambda: ops.Map(fn), parallelism, backpressure)

    def filter(self, name: str, fn: Callable[[Batch], np.ndarray], *, parallelism: int | None = None,
               backpressure: str = "block") -> Stream:
        """Keeps the rows where ``fn(batch)`` (a bool mask) is true."""
        return self._then(name, lambda: ops.Filter(fn), parallelism, backpressure)

    def flat_map(self, name: str, fn: Callable[[Batch], Iterable[Batch]], *, parallelism: int | None = None,
                 backpressure: str = "block") -> Stream:
        """batch -> zero or more batches."""
        return self._then(name, lambda: ops.FlatMap(fn), parallelism, backpressure)

    def process(self, name: str, make: Callable[[], ops.Operator], *, parallelism: int | None = None,
                backpressure: str = "block") -> Stream:
        """A user :class:`~mpstream.operators.Operator` (a fresh ``make()`` per instance); after
        ``key_by`` a :class:`~mpstream.operators.KeyedOperator` keeps state per key group."""
        return self._then(name, make, parallelism, backpressure)

    def union(self, *others: Stream) -> Stream:
        """The rows of this stream and others, read fairly by the next operator."""
        return Stream(self.pipeline, self.upstreams + [n for o in others for n in o.upstreams], self._partitioner)

    def key_by(self, key: str, partitioner: str | Callable[[Batch, int], np.ndarray] = "hash", *,
               bounds: Sequence[float] | None = None) -> KeyedStream:
        """Partitions the next operator's input by ``key``: "hash" (default: by key group),
        "range" (with sorted ``bounds``, parallelism - 1 of them), "round_robin" (whole batches
        in turn: balance, but a key's rows may go anywhere) or a function ``fn(batch, n) -> ids``."""
        if partitioner == "hash":
            factory: Callable[[], Partitioner] = lambda: HashPartitioner(key)  # noqa: E731
        elif partitioner == "round_robin":
            factory = RoundRobinPartitioner
        elif partitioner == "range":
            if bounds is None:
                raise ValueError("a range partitioner needs bounds")
            factory = lambda: RangePartitioner(key, bounds)  # noqa: E731
        elif callable(partitioner):
            factory = lambda: CustomPartitioner(partitioner)  # noqa: E731
        else:
            raise ValueError(f"partitioner must be 'hash', 'range', 'round_robin' or a function, got {partitioner!r}")
        return KeyedStream(self.pipeline, self.upstreams, factory, key)

    def rebalance(self) -> Stream:
        """Round-robin: whole batches in turn to the next operator's instances."""
        return Stream(self.pipeline, self.upstreams, RoundRobinPartitioner)

    # ---- sinks --------------------------------------------------------------------------------

    def collect(self, name: str) -> None:
        """Returns every batch to the caller: ``pipeline.run()[name]`` is their concatenation."""
        self._then(name, ops.Operator, None, collect=True)

    def to_files(self, name: str, directory: str, fmt: str = "csv", *, transactional: bool = False) -> None:
        """One file per instance: ``{directory}/{name}-{instance}.csv`` or ``.npz``. With
        ``transactional=True`` (CSV, for jobs with checkpoints): exactly-once output by
        two-phase commit, one file per instance and checkpoint epoch (see
        :class:`~mpstream.operators.TransactionalFileSink`)."""
        if transactional:
            self._then(name, lambda: ops.TransactionalFileSink(directory), None)
        else:
            self._then(name, lambda: ops.FileSink(directory, fmt), None)

    def to_callback(self, name: str, fn: Callable[[Batch], None]) -> None:
        """Calls ``fn(batch)`` in the sink's worker process."""
        self._then(name, lambda: ops.CallbackSink(fn), None)


class KeyedStream(Stream):
    """A stream partitioned by a key: its next operator gets all rows of a key in one instance."""

    def __init__(self, pipeline: Pipeline, upstreams: list[Node], partitioner: Callable[[], Partitioner], key: str) -> None:
        super().__init__(pipeline, upstreams, partitioner)
        self.key = key

    def aggregate(self, name: str, spec: Mapping[str, str | Sequence[str]], *, parallelism: int | None = None,
                  salt: int = 0, combiner_delay_s: float = 0.1) -> Stream:
        """Per key: ``spec`` maps a column to sum/count/min/max/mean (or a list; "*": "count").
        Result columns: the key, ``{column}_{function}`` and ``count``.

        ``salt=n`` (n > 1) makes it two-stage, for hot keys. Each upstream instance first
        pre-aggregates its rows in a :class:`~mpstream.aggregate.Combiner` (one partial row
        per key, handed on when its oldest row has waited ``combiner_delay_s`` seconds, at
        every checkpoint barrier and at the end); the partial rows go to a partial
        aggregate ``{name}.partial`` by key plus a salt ``row % n`` (so one key spreads evenly
        over min(n, parallelism) partitions), and its partials go by key to the final ``name``.
        Results equal the unsalted ones (float sums up to rounding: another order).
        """
        key = self.key
        if combiner_delay_s < 0:
            raise ValueError(f"operator {name!r}: combiner_delay_s must be >= 0, got {combiner_delay_s}")
        if salt > 1:
            partial = self._then(f"{name}.partial", lambda: ops.Aggregate(key, spec, "partials", "partials", False),
                                 parallelism, partitioner=lambda: HashPartitioner(key, salt),
                                 combiner=functools.partial(Combiner, key, spec, combiner_delay_s))
            return partial._then(name, lambda: ops.Aggregate(key, spec, "partials", "results"), parallelism,
                                 partitioner=lambda: HashPartitioner(key))
        return self._then(name, lambda: ops.Aggregate(key, spec), parallelism)

