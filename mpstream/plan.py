"""The job graph: operators (nodes), the edges between them, and how they map onto tasks and
channels. The pipeline API builds it; the coordinator runs it. It holds factories, not
running operators, and imports nothing of the runtime.

* A :class:`Node` is a named operator with a parallelism and a factory making one instance.
* An :class:`Edge` feeds a node from an upstream node: forward (instance i to i, equal
  parallelism) or through a partitioner (every upstream instance to every instance).
* A **task** is one OS process: one instance of a node plus the instances of the nodes
  *chained* to it (``Node.chained``: its only input is a forward edge from a node of the
  task), which get its output by a function call instead of a channel (Flink's operator
  chains). A **channel** is one ring from a producing task to a consuming task.

>>> graph = JobGraph()
>>> _ = graph.add(Node("src", 2, object))
>>> _ = graph.add(Node("double", 2, object, [Edge("src")], chained=True))
>>> _ = graph.add(Node("sum", 1, object, [Edge("double", partitioner=object)]))
>>> [(t.name, [o.name for o in t.operators], t.inputs) for t in graph.tasks()]
[('src[0]', ['src', 'double'], ()), ('src[1]', ['src', 'double'], ()), ('sum[0]', ['sum'], ('double.0-sum.0', 'double.1-sum.0'))]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PlanError

if TYPE_CHECKING:
    from .operators import Operator
    from .partition import Partitioner
    from .watermarks import EventTime

__all__ = ["Edge", "Node", "OutputSpec", "OperatorSpec", "TaskSpec", "JobGraph", "check_name", "check_parallelism"]


def check_name(name: Any) -> str:
    """An operator name: it names state files and output files, so it must be one."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise PlanError(f"operator name {name!r} cannot be used: a name must be a non-empty str that is a valid "
                        f"file name (no '/', no NUL, not '.' or '..'); it names the operator's checkpoint and "
                        f"output files")
    return name


def check_parallelism(name: str, parallelism: Any) -> int:
    if not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 1:
        raise PlanError(f"operator {name!r}: parallelism must be an int >= 1, got {parallelism!r}")
    return parallelism


MAIN = "main"  # the output port every operator has; others are side outputs (e.g. "late")


@dataclass(frozen=True)
class Edge:
    """Rows from every instance of ``upstream`` into the node owning this edge, partitioned by a
    fresh ``partitioner()`` per upstream instance; None means forward (instance i to i).
    ``drop``: when out of credit, shed (and count) instead of waiting. ``port``: which output
    of the upstream operator (its main one, or a side output such as "late")."""

    upstream: str
    partitioner: Callable[[], Partitioner] | None = None
    drop: bool = False
    port: str = MAIN


@dataclass
class Node:
    """One operator of the job: ``make()`` builds an instance (in its worker process).

    ``collect``: its output returns to the caller of ``run()``. ``chained``: it runs in the task
    of its upstream (see the module doc). ``partitioning``: how its input is partitioned,
    "hash", "salted", "range", "custom", "round_robin" or None (forward); it says whether its
    keyed state can move to another parallelism on restore. ``event_time``: for a source, its
    event-time column and watermarks. ``prepare``: run in the coordinator before each attempt
    forks its workers (a file source plans its files again if they changed)."""

    name: str
    parallelism: int
    make: Callable[[], Operator]
    inputs: list[Edge] = field(default_factory=list)
    collect: bool = False
    chained: bool = False
    partitioning: str | None = None
    event_time: EventTime | None = None
    prepare: Callable[[], None] | None = None

    @property
    def is_source(self) -> bool:
        return not self.inputs


@dataclass(frozen=True)
class OutputSpec:
    """One output edge of an operator instance: the channel to each target instance (one
    channel for a forward edge), how to pick one, and the operator's output port it carries."""

    channels: tuple[str, ...]
    partitioner: Callable[[], Partitioner] | None
    drop: bool
    port: str = MAIN


@dataclass(frozen=True)
class OperatorSpec:
    """One operator instance inside a task: its node, what it feeds in the same task (chained:
    (operator name, port)) and through channels."""

    node: Node
    instance: int
    chained: tuple[tuple[str, str], ...]
    outputs: tuple[OutputSpec, ...]

    @property
    def ports(self) -> frozenset[str]:
        """The output ports something reads (an operator need not produce the others)."""
        return frozenset([port for _, port in self.chained] + [o.port for o in self.outputs])

    @property
    def name(self) -> str:
        return self.node.name


@dataclass(frozen=True)
class TaskSpec:
    """One process: its operators (the head first, then those chained to it, upstream before
    downstream), the channels the head reads and, for each, the producing operator instance
    (``"name.instance"``: what a checkpointed watermark of the channel is kept under)."""

    name: str
    instance: int
    operators: tuple[OperatorSpec, ...]
    inputs: tuple[str, ...]
    producers: tuple[str, ...] = ()

    @property
    def head(self) -> OperatorSpec:
        return self.operators[0]

    @property
    def is_source(self) -> bool:
        return self.head.node.is_source


def channel_label(producer: str, producer_instance: int, consumer: str, consumer_instance: int) -> str:
    return f"{producer}.{producer_instance}-{consumer}.{consumer_instance}"


class JobGraph:
    """Nodes in the order they were added (every edge points to an earlier node)."""

    def __init__(self, channel_capacity: int = 1 << 22, name: str = "job") -> None:
        self.nodes: list[Node] = []
        self.channel_capacity = channel_capacity
        self.name = name  # what mpstream top calls the job

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def add(self, node: Node) -> Node:
        check_name(node.name)
        check_parallelism(node.name, node.parallelism)
        if any(n.name == node.name for n in self.nodes):
            raise PlanError(f"operator name {node.name!r} is used twice; every operator needs its own name")
        for edge in node.inputs:
            self.node(edge.upstream)  # an earlier node
        if node.chained:
            up = self.node(node.inputs[0].upstream) if len(node.inputs) == 1 else None
            if up is None or node.inputs[0].partitioner is not None or up.parallelism != node.parallelism:
                raise PlanError(f"operator {node.name!r} cannot be chained: chaining needs one forward input "
                                f"of equal parallelism")
        self.nodes.append(node)
        return node

    def consumers(self, name: str) -> list[tuple[Node, Edge]]:
        return [(n, e) for n in self.nodes for e in n.inputs if e.upstream == name]

    def _outputs(self, node: Node, instance: int) -> tuple[tuple[str, ...], tuple[OutputSpec, ...]]:
        chained, outputs = [], []
        for consumer, edge in self.consumers(node.name):
            if consumer.chained:
                chained.append((consumer.name, edge.port))
                continue
            targets = [instance] if edge.partitioner is None else range(consumer.parallelism)
            outputs.append(OutputSpec(tuple(channel_label(node.name, instance, consumer.name, c) for c in targets),
                                      edge.partitioner, edge.drop, edge.port))
        return tuple(chained), tuple(outputs)

    def tasks(self) -> list[TaskSpec]:
        """One task per instance of every node that is not chained."""
        tasks = []
        for node in self.nodes:
            if node.chained:
                continue
            for instance in range(node.parallelism):
                operators, todo = [], [node]
                while todo:
                    current = todo.pop(0)
                    chained, outputs = self._outputs(current, instance)
                    operators.append(OperatorSpec(current, instance, chained, outputs))
                    todo += [self.node(name) for name, _ in chained]
                producers = [(edge.upstream, pi) for edge in node.inputs
                             for pi in ([instance] if edge.partitioner is None
                                        else range(self.node(edge.upstream).parallelism))]
                inputs = tuple(channel_label(up, pi, node.name, instance) for up, pi in producers)
                tasks.append(TaskSpec(f"{node.name}[{instance}]", instance, tuple(operators), inputs,
                                      tuple(f"{up}.{pi}" for up, pi in producers)))
        return tasks

    def channels(self) -> list[str]:
        return [label for task in self.tasks() for label in task.inputs]
