"""Operators: the per-instance logic a task runs, as small lifecycle classes.

The contract (every hook optional but ``process``)::

    open(ctx)                            once, before anything else; ctx.timers registers timers
    restore(states)                      after open, when the job starts from a checkpoint
    process(batch) -> Output             every input batch
    on_timer(timer) -> Output            a timer registered through ctx.timers is due
    prepare_snapshot_pre_barrier(n) -> Output
                                         a checkpoint barrier arrived: output that must precede it
    snapshot() -> state                  the operator's state for checkpoint n (picklable, owned)
    notify_checkpoint_complete(n)        checkpoint n is committed (two-phase-commit sinks publish)
    close() -> Output                    the end of the input: final output

An ``Output`` is a :class:`~mpstream.batch.Batch`, a mapping of columns, an iterable of those,
or None. Batches passed to ``process`` hold views on shared memory, valid during the call:
return them (or slices of them) freely, they are copied downstream; ``copy()`` what you keep.

``restore`` has one signature for every operator: it gets a list of states. An operator that
declares ``rescalable = True`` gets the states of every instance of the checkpoint (any old
parallelism) and keeps what belongs to its key groups; any other gets a list holding its own
state only, and its parallelism cannot change on restore (unless its states are all None).
``resumable = False`` declares an operator that cannot be restored at all (a job with
checkpoints refuses it up front); ``commits_on_checkpoint = True`` one that publishes output
when a checkpoint commits (the job's final checkpoint must then succeed before it ends).

>>> class RunningTotal(Operator):
...     def open(self, ctx):
...         self.total = 0
...     def process(self, batch):
...         self.total += int(batch["x"].sum())
...     def snapshot(self):
...         return self.total
...     def restore(self, states):
...         self.total = states[0]
...     def close(self):
...         return {"total": np.array([self.total])}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np

from .aggregate import Combiner, KeyedAggregate
from .batch import Batch
from .partition import groups_of_instance, key_groups
from .state import KeyedState
from .timers import Timer, TimerService

__all__ = ["Context", "Operator", "KeyedOperator", "Output", "Map", "Filter", "FlatMap", "Aggregate", "Combine"]

Output = Union[Batch, Mapping[str, Any], Iterable[Union[Batch, Mapping[str, Any]]], None]


@dataclass(frozen=True)
class Context:
    """Where an operator instance runs: its name, instance index and parallelism, its timers,
    and whether the job takes checkpoints."""

    name: str
    instance: int
    parallelism: int
    timers: TimerService = field(default_factory=TimerService, compare=False, repr=False)
    checkpointing: bool = False


class Operator:
    """Lifecycle of one operator instance (see the module doc)."""

    #: restore() takes the states of every instance of the checkpoint and keeps its key groups.
    rescalable: ClassVar[bool] = False
    #: False: the operator cannot be restored after a failure; jobs with checkpoints refuse it.
    resumable: bool = True
    #: True: it publishes output in notify_checkpoint_complete (two-phase commit), so a job's
    #: final checkpoint must commit before the job ends.
    commits_on_checkpoint: ClassVar[bool] = False

    def open(self, ctx: Context) -> None:
        self.ctx = ctx

    def process(self, batch: Batch) -> Output:
        return batch

    def on_timer(self, timer: Timer) -> Output:
        return None

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        return None

    def snapshot(self) -> Any:
        return None

    def restore(self, states: list[Any]) -> None:
        pass

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        pass

    def close(self) -> Output:
        return None


def own_key_groups(ctx: Context) -> range:
    """The key groups an operator instance owns (see :mod:`mpstream.partition`)."""
    return groups_of_instance(ctx.instance, ctx.parallelism)


class KeyedOperator(Operator):
    """A stateful operator after ``key_by``: it sees every row of the keys in its key groups;
    ``self.state`` is their :class:`~mpstream.state.KeyedState`, snapshotted and restored per
    key group, so it restores at another parallelism too."""

    rescalable = True

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.state = KeyedState(own_key_groups(ctx))

    def snapshot(self) -> Any:
        return self.state.snapshot()

    def restore(self, states: list[Any]) -> None:
        self.state.restore(states)


# ---- transforms ---------------------------------------------------------------------------

class Map(Operator):
    def __init__(self, fn: Callable[[Batch], Batch | Mapping[str, Any]]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        return self.fn(batch)


class Filter(Operator):
    def __init__(self, fn: Callable[[Batch], np.ndarray]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        return batch.filter(self.fn(batch))


class FlatMap(Operator):
    def __init__(self, fn: Callable[[Batch], Iterable[Batch]]) -> None:
        self.fn = fn

    def process(self, batch: Batch) -> Output:
        return self.fn(batch)


# ---- aggregation --------------------------------------------------------------------------

def _keep_own_groups(ctx: Context, key: str, partials: Iterable[Batch | None]) -> Iterable[Batch]:
    """The rows of partial batches whose key falls in this instance's key groups."""
    mine = own_key_groups(ctx)
    for partial in partials:
        if partial is not None:
            groups = key_groups(partial[key])
            yield partial.filter((groups >= mine.start) & (groups < mine.stop))


class Aggregate(Operator):
    """Keyed aggregation of raw rows (``inputs="rows"``) or of partials from a
    :class:`Combine` (``inputs="partials"``) into one result row per key.

    ``emit="final"``: every key's row when the input ends. ``emit="updates"`` (for unbounded
    streams): the rows of the keys that changed, every ``update_interval`` seconds, before
    every checkpoint barrier and at the end: an upsert stream whose newest row per key is that
    key's result so far."""

    rescalable = True

    def __init__(self, key: str, spec: Mapping[str, str | Sequence[str]], inputs: str = "rows",
                 emit: str = "final", update_interval: float = 1.0) -> None:
        self.key, self.spec, self.inputs, self.emit = key, spec, inputs, emit
        self.update_interval = update_interval

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.state = KeyedAggregate(self.key, self.spec, track_changes=self.emit == "updates")
        self._add = self.state.merge if self.inputs == "partials" else self.state.update
        self._timer: Timer | None = None

    def process(self, batch: Batch) -> Output:
        self._add(batch)
        if self.emit == "updates" and self._timer is None:
            self._timer = self.ctx.timers.register_processing_time(time.time() + self.update_interval)
        return None

    def on_timer(self, timer: Timer) -> Output:
        self._timer = None
        return self.state.take_changes()

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        return self.state.take_changes() if self.emit == "updates" else None

    def snapshot(self) -> Any:
        return self.state.partial() if len(self.state) else None

    def restore(self, states: list[Any]) -> None:
        for partial in _keep_own_groups(self.ctx, self.key, states):
            self.state.merge(partial)
        self.state.forget_changes()  # restored rows were emitted before the checkpoint

    def close(self) -> Output:
        return self.state.take_changes() if self.emit == "updates" else self.state.result()


class Combine(Operator):
    """Pre-aggregates rows (or merges partials) into one partial row per key and hands the
    partials on (Flink's local aggregation): when its oldest held row has waited
    ``max_delay_s`` (a processing-time timer), when it holds ``max_keys`` keys, before every
    checkpoint barrier when ``flush_at_barrier`` (its state is then empty at every checkpoint),
    and at the end. Without ``flush_at_barrier`` it keeps what it holds in its snapshot."""

    rescalable = True

    def __init__(self, key: str, spec: Mapping[str, str | Sequence[str]], inputs: str = "rows",
                 max_delay_s: float = 0.1, max_keys: int = 1 << 20, flush_at_barrier: bool = True) -> None:
        self.key, self.spec, self.inputs = key, spec, inputs
        self.max_delay_s, self.max_keys, self.flush_at_barrier = max_delay_s, max_keys, flush_at_barrier

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.combiner = Combiner(self.key, self.spec, self.max_delay_s, self.max_keys)
        self._add = self.combiner.add_partials if self.inputs == "partials" else self.combiner.add
        self._timer: Timer | None = None
        self._emitted = False

    def _arm(self) -> None:
        """Keeps one processing-time timer at the held rows' due time."""
        due = self.combiner.due
        if self._timer is not None and (due is None or self._timer.time != due):
            self.ctx.timers.delete(self._timer)
            self._timer = None
        if due is not None and self._timer is None and math.isfinite(due):
            self._timer = self.ctx.timers.register_processing_time(due)

    def _flush(self) -> Batch | None:
        out = self.combiner.flush()
        self._emitted |= out is not None
        self._arm()
        return out

    def process(self, batch: Batch) -> Output:
        out = self._add(batch)
        self._emitted |= out is not None
        self._arm()
        return out

    def on_timer(self, timer: Timer) -> Output:
        self._timer = None
        return self._flush()

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        return self._flush() if self.flush_at_barrier else None

    def snapshot(self) -> Any:
        return self.combiner.held()

    def restore(self, states: list[Any]) -> None:
        for partial in _keep_own_groups(self.ctx, self.key, states):
            self.combiner.add_partials(partial)
        self._arm()

    def close(self) -> Output:
        out = self._flush()
        if out is None and not self._emitted:
            return self.combiner.empty()  # no rows at all: the schema still goes on
        return out
