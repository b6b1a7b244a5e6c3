"""Event time: timestamps, watermarks, idleness, and how a task combines its inputs' watermarks.

A WATERMARK(W) record on a channel promises that no later record on that channel has an event
time below W (Beam's, Bytewax's and Arroyo's meaning; Flink's ``Watermark(t)`` is one less).
Timestamps are int64 in the unit of the event-time column (or the unit of its datetime64).

* :class:`EventTime` names a source's event-time column and its watermark strategy:
  bounded out-of-orderness ``B`` (``W = max timestamp seen - B``; 0 for ordered input) or a
  function of each batch; an ``idle_timeout`` after which a source instance that produced
  nothing (counting only time it was not blocked on credit) marks itself idle.
* :class:`WatermarkGenerator` runs that strategy for one source instance (one per source
  partition).
* :class:`WatermarkValve` combines a task's input channels exactly as Flink's
  StatusWatermarkValve: the output is the minimum over active, aligned channels, emitted only
  when it grows; an idle channel is left out; when every channel is idle the maximum is
  emitted, then the task itself goes idle; a channel that comes back rejoins only once it has
  caught up with the last output. END_OF_STREAM counts as WATERMARK(+inf).

>>> valve = WatermarkValve(2)
>>> valve.watermark(0, 10), valve.watermark(1, 4), valve.watermark(1, 12)
(None, 4, 10)
>>> valve.status(0, idle=True), valve.watermark(1, 15)   # channel 0 idle: 1 alone counts
((12, None), 15)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batch import Batch, StringColumn, null_mask, values_of
from .errors import SourceError

__all__ = ["EventTime", "WatermarkGenerator", "WatermarkValve", "MIN_TIME", "MAX_TIME", "timestamps"]

MIN_TIME = np.iinfo(np.int64).min  # "minus infinity": nothing promised yet
MAX_TIME = np.iinfo(np.int64).max  # "plus infinity": the end of the input


@dataclass(frozen=True)
class EventTime:
    """How a source's records carry event time and how its watermarks are made.

    ``column``: an int64 column (in the job's time unit) or a datetime64 column (its unit is
    the job's). ``max_out_of_orderness``: how far behind the largest timestamp seen a record may
    still come (``W = max - B``). ``watermark``: instead, ``fn(batch) -> int | None``, the
    watermark after a batch (it may only grow; None keeps the last). ``idle_timeout`` (seconds
    of unblocked time without a record) marks the instance idle; ``interval`` (seconds) is how
    often, while input flows, the source re-checks its watermark and idleness."""

    column: str
    max_out_of_orderness: int = 0
    watermark: Callable[[Batch], int | None] | None = None
    idle_timeout: float | None = None
    interval: float = 0.2


def timestamps(batch: Batch, column: str, where: str) -> np.ndarray:
    """The event-time column of a batch as int64 (datetime64 in its own unit); an error naming
    the column when it is missing or not a time column."""
    try:
        col = batch[column]
    except KeyError:
        raise SourceError(f"{where}: the event-time column {column!r} is not in the batch "
                          f"(columns: {list(batch)}); every record needs a timestamp") from None
    nulls = null_mask(col)
    if nulls is not None and nulls.any():
        raise SourceError(f"{where}: the event-time column {column!r} is null (no timestamp) at row "
                          f"{int(np.flatnonzero(nulls)[0])}; every record needs a timestamp")
    col = values_of(col)
    if isinstance(col, StringColumn) or col.dtype.kind not in "iuM":
        dtype = "str" if isinstance(col, StringColumn) else col.dtype
        raise SourceError(f"{where}: the event-time column {column!r} has dtype {dtype}; it must be int64 "
                          f"(in the job's time unit) or datetime64")
    if col.dtype.kind == "M":
        ints = col.view(np.int64)
        if len(ints) and int(ints.min()) == MIN_TIME:  # NaT
            raise SourceError(f"{where}: the event-time column {column!r} has NaT (no timestamp) at row "
                              f"{int(np.flatnonzero(np.isnat(col))[0])}; every record needs a timestamp")
        return ints
    if col.dtype.kind == "u" and len(col) and int(col.max()) > MAX_TIME:
        raise SourceError(f"{where}: the event-time column {column!r} holds values beyond int64")
    return col.astype(np.int64, copy=False)


class WatermarkGenerator:
    """The watermark of one source instance (see :class:`EventTime`). :meth:`on_batch` after
    every batch it produced returns the watermark to emit, if it grew; :meth:`probe` on a timer
    says whether the instance has gone idle. Its state is part of the source's checkpoint."""

    def __init__(self, spec: EventTime, where: str) -> None:
        self.spec, self.where = spec, where
        self.max_seen = MIN_TIME
        self.emitted = MIN_TIME  # the last watermark sent
        self.idle = False
        self._active_since = time.monotonic()  # last record (or start), for idleness
        self._blocked_then = 0.0  # credit-wait seconds at that moment

    def on_batch(self, batch: Batch, blocked_s: float) -> int | None:
        """After a batch went out: the new watermark, or None when it did not grow."""
        self._active_since, self._blocked_then = time.monotonic(), blocked_s
        if batch.num_rows == 0 and self.spec.watermark is None:
            return None
        ts = timestamps(batch, self.spec.column, self.where)
        if self.spec.watermark is not None:
            candidate = self.spec.watermark(batch)
            if candidate is None:
                return None
            candidate = int(candidate)
        else:
            if len(ts):
                self.max_seen = max(self.max_seen, int(ts.max()))
            if self.max_seen == MIN_TIME:
                return None
            candidate = self.max_seen - self.spec.max_out_of_orderness
        if candidate <= self.emitted:
            return None
        self.emitted = candidate
        return candidate

    def probe(self, blocked_s: float) -> bool:
        """True when the instance has just gone idle: no record for ``idle_timeout`` seconds
        of time it was not blocked on credit (a backpressured source is busy, not idle)."""
        if self.idle or self.spec.idle_timeout is None:
            return False
        unblocked = time.monotonic() - self._active_since - (blocked_s - self._blocked_then)
        if unblocked > self.spec.idle_timeout:
            self.idle = True
            return True
        return False

    def state(self) -> dict[str, Any]:
        return {"max_seen": self.max_seen, "emitted": self.emitted}

    def restore(self, state: dict[str, Any]) -> None:
        self.max_seen, self.emitted = state["max_seen"], state["emitted"]


@dataclass
class _Channel:
    watermark: int = MIN_TIME
    idle: bool = False
    aligned: bool = True


class WatermarkValve:
    """A task's watermark from its input channels' (Flink's StatusWatermarkValve; see the module
    doc). :meth:`watermark` and :meth:`status` return what the task must emit, if anything."""

    def __init__(self, channels: int) -> None:
        self.channels = [_Channel() for _ in range(channels)]
        self.output = MIN_TIME  # the last watermark emitted
        self.idle = False  # the task's own status (every channel idle)

    def _aligned_min(self) -> int | None:
        values = [c.watermark for c in self.channels if c.aligned and not c.idle]
        return min(values) if values else None

    def _advance(self) -> int | None:
        low = self._aligned_min()
        if low is not None and low > self.output:
            self.output = low
            return low
        return None

    def watermark(self, channel: int, value: int) -> int | None:
        """WATERMARK(value) on a channel; returns the task's new watermark, if it grew."""
        c = self.channels[channel]
        if c.idle or value <= c.watermark:
            return None  # idle channels are ignored; regressions are dropped
        c.watermark = value
        if not c.aligned and value >= self.output:
            c.aligned = True
        return self._advance()

    def status(self, channel: int, idle: bool) -> tuple[int | None, bool | None]:
        """STATUS on a channel; returns (a watermark to emit or None, the task's new status
        or None when it did not change), in that order."""
        c = self.channels[channel]
        if idle == c.idle:
            return None, None
        if idle:
            c.idle, c.aligned = True, False
            if all(ch.idle for ch in self.channels):
                top = max(ch.watermark for ch in self.channels)
                out = None
                if top > self.output:
                    self.output = out = top
                self.idle = True
                return out, True
            return self._advance(), None
        c.idle = False
        c.aligned = c.watermark >= self.output
        if self.idle:
            self.idle = False
            return None, False
        return None, None

    def state(self, producers: list[str]) -> dict[str, Any]:
        """The output watermark and, per channel (named by its producer), its watermark, idle
        and aligned flags: what :meth:`restore` takes back (idleness follows from them)."""
        return {"output": self.output,
                "channels": {p: (c.watermark, c.idle, c.aligned) for p, c in zip(producers, self.channels)}}

    def restore(self, output: int, channel_states: list[tuple[int, bool, bool] | None]) -> None:
        """The output watermark as checkpointed; per channel its saved state, or, for a channel
        new since (another parallelism upstream), the output watermark; idle when every
        channel is."""
        self.output = output
        for c, saved in zip(self.channels, channel_states):
            if saved is None:
                c.watermark, c.idle, c.aligned = self.output, False, True
            else:
                c.watermark, c.idle, c.aligned = saved
        self.idle = all(c.idle for c in self.channels)
