"""Operators: the per-instance logic a task runs, as small lifecycle classes.

The contract (every hook optional but ``process``)::

    open(ctx)                            once, before anything else; ctx.timers registers timers
    restore(states)                      after open, when the job starts from a checkpoint
    process(batch) -> Output             every input batch
    on_timer(timer) -> Output            a timer registered through ctx.timers is due
    on_watermark(watermark) -> Output    the operator's event time advanced (after its due
                                         event-time timers fired; the watermark goes on after)
    prepare_snapshot_pre_barrier(n) -> Output
                                         a checkpoint barrier arrived: output that must precede it
    snapshot() -> state                  the operator's state for checkpoint n (picklable; unchanged
                                         at least until checkpoint n is written)
    notify_checkpoint_complete(n)        checkpoint n is committed (two-phase-commit sinks publish)
    close() -> Output                    the end of the input: final output

An ``Output`` is a :class:`~mpstream.batch.Batch`, a mapping of columns, an iterable of those,
or None. Batches passed to ``process`` hold views on shared memory, valid during the call:
return them (or slices of them) freely, they are copied downstream; ``copy()`` what you keep.

``restore`` has one signature for every operator: it gets a list of states. At an unchanged
parallelism it is the instance's own state. At another one, an operator that declares
``rescalable = True`` gets the states of every old instance (``ctx.rescaled`` is then true) and
keeps what belongs to its key groups; any other cannot change its parallelism on restore
(unless its states are all None). ``restores_all = True`` gives it the states of every
instance at an unchanged parallelism too, in instance order (a file source's instances share
one list of units: each needs to know what all of them had done).
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

import itertools
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

__all__ = ["Context", "Operator", "KeyedOperator", "Output", "Map", "Filter", "FlatMap", "Aggregate", "Combine",
           "own_key_groups", "own_rows"]

Output = Union[Batch, Mapping[str, Any], Iterable[Union[Batch, Mapping[str, Any]]], None]


def _no_side_output(port: str, out: Output) -> None:
    raise ValueError(f"no side output {port!r} outside a running task")


@dataclass(eq=False)
class Context:
    """Where an operator instance runs: its name, instance index and parallelism, its timers,
    whether the job takes checkpoints; ``side_output(port, out)`` emits to another output port
    than the main one, and ``ports`` says which of its ports something reads; ``counters``
    are added to the instance's statistics (e.g. ``late_records_dropped``). During ``restore``,
    ``rescaled`` is true when the states are those of every old instance (the parallelism
    changed): keep only your key groups' part (:func:`own_rows`); else it is your own state.
    ``claim()`` returns 0, 1, 2, ... across all instances of the operator together, each number
    once, counting from 0 at every start of the job (a restart too): instances that take work
    from one list take it with it, as a file source's take units. Outside a job, it counts for
    this instance alone."""

    name: str
    instance: int
    parallelism: int
    timers: TimerService = field(default_factory=TimerService, compare=False, repr=False)
    checkpointing: bool = False
    side_output: Callable[[str, Output], None] = field(default=_no_side_output, compare=False, repr=False)
    ports: frozenset[str] = frozenset()
    counters: dict[str, int] = field(default_factory=dict)
    rescaled: bool = False
    claim: Callable[[], int] = field(default_factory=lambda: itertools.count().__next__, compare=False, repr=False)


class Operator:
    """Lifecycle of one operator instance (see the module doc)."""

    #: restore() takes the states of every instance of the checkpoint and keeps its key groups.
    rescalable: ClassVar[bool] = False
    #: restore() takes the states of every instance at an unchanged parallelism too (instances
    #: that share one pool of work, as a file source's: each needs what all of them had done).
    restores_all: ClassVar[bool] = False
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

    def on_watermark(self, watermark: int) -> Output:
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
        self.state.restore(states, own_only=not self.ctx.rescaled)


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

def own_rows(ctx: Context, key: str, batch: Batch | None) -> Batch | None:
    """In ``restore``: the rows of a checkpointed batch this instance keeps: all of them when
    it is its own state, else those whose key falls in its key groups (None: no row)."""
    if batch is None or not batch.num_rows:
        return None
    if not ctx.rescaled:
        return batch
    mine = own_key_groups(ctx)
    groups = key_groups(batch[key])
    keep = (groups >= mine.start) & (groups < mine.stop)
    return batch.filter(keep) if keep.any() else None


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
        # A snapshot's arrays are lent to the checkpoint writer until the checkpoint commits
        # (the writer wrote them before acknowledging): then the next snapshot copies into
        # them, not into fresh memory, which paused a task tens of ms per copy at 90 MB.
        # Only the newest snapshot's arrays are kept: letting go of older ones is always safe.
        # (A subclass that overrides notify_checkpoint_complete calls super() to reuse them.)
        self._checkpoint: int | None = None  # the checkpoint being taken
        self._lent: tuple[int, dict[str, np.ndarray]] | None = None  # (checkpoint id, its snapshot's arrays)
        self._spare: dict[str, np.ndarray] = {}  # the arrays of a committed snapshot

    def process(self, batch: Batch) -> Output:
        self._add(batch)
        if self.emit == "updates" and self._timer is None:
            self._timer = self.ctx.timers.register_processing_time(time.time() + self.update_interval)
        return None

    def on_timer(self, timer: Timer) -> Output:
        self._timer = None
        return self.state.take_changes()

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        self._checkpoint = checkpoint_id
        return self.state.take_changes() if self.emit == "updates" else None

    def snapshot(self) -> Any:
        checkpoint, self._checkpoint = self._checkpoint, None
        if not len(self.state):
            return None
        if checkpoint is None:  # not for a checkpoint: nothing says when it is let go
            return self.state.partial()
        buffers, self._spare = self._spare, {}
        self._lent = (checkpoint, buffers)
        return self.state.partial(buffers)

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        if self._lent is not None and self._lent[0] <= checkpoint_id:  # written (tasks ack once they wrote)
            self._spare, self._lent = self._lent[1], None

    def restore(self, states: list[Any]) -> None:
        for partial in filter(None, (own_rows(self.ctx, self.key, s) for s in states)):
            self.state.merge(partial)
        self.state.forget_changes()  # restored rows were emitted before the checkpoint

    def close(self) -> Output:
        return self.state.take_changes() if self.emit == "updates" else self.state.result()


class Combine(Operator):
    """Pre-aggregates rows into one partial row per key and hands the partials on (Flink's
    local aggregation): when its oldest held row has waited ``max_delay_s`` (a
    processing-time timer), when it holds ``max_keys`` keys, before every checkpoint barrier
    (so it holds no state at any checkpoint: it restores at any parallelism) and at the end."""

    def __init__(self, key: str, spec: Mapping[str, str | Sequence[str]], *, max_delay_s: float = 0.1,
                 max_keys: int = 1 << 20) -> None:
        self.key, self.spec = key, spec
        self.max_delay_s, self.max_keys = max_delay_s, max_keys

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.combiner = Combiner(self.key, self.spec, self.max_delay_s, self.max_keys)
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

    def _flush(self, last: bool = False) -> Batch | None:
        out = self.combiner.flush(last)
        self._emitted |= out is not None
        self._arm()
        return out

    def process(self, batch: Batch) -> Output:
        out = self.combiner.add(batch)
        self._emitted |= out is not None
        self._arm()
        return out

    def on_timer(self, timer: Timer) -> Output:
        self._timer = None
        return self._flush()

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        return self._flush()  # so it has no state to snapshot

    def close(self) -> Output:
        out = self._flush(last=True)  # a key map's accumulators themselves go on: no copy at the end
        if out is None and not self._emitted:
            return self.combiner.empty()  # no rows at all: the schema still goes on
        return out
