"""Timers of one operator instance: processing time (the wall clock) and event time (watermarks).

An operator registers a timer through ``ctx.timers`` and gets it back in ``on_timer`` once it is
due: a processing-time timer when ``time.time()`` reaches it (the task wakes for it, input or
not), an event-time timer when the watermark reaches it. A timer is a (domain, time, payload)
triple; registering the same triple twice keeps one. Pending timers are part of every
checkpoint, so they fire after a restore too (processing-time ones that fell due meanwhile at
once).

>>> timers = TimerService()
>>> t = timers.register_processing_time(5.0, "flush")
>>> timers.register_processing_time(5.0, "flush") == t, timers.next_processing_time()
(True, 5.0)
>>> timers.due_processing(4.0), [x.payload for x in timers.due_processing(6.0)]
([], ['flush'])
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from collections.abc import Callable
from typing import Hashable

__all__ = ["Timer", "TimerService", "PROCESSING_TIME", "EVENT_TIME"]

PROCESSING_TIME = "processing"
EVENT_TIME = "event"


@dataclass(frozen=True, order=True)
class Timer:
    """``time``: seconds since the epoch (processing time) or the job's event-time unit.
    ``key_group``: the key group of the key the timer was registered for (None: the operator
    instance's own timer); a restore at another parallelism gives each instance the timers of
    its key groups, and its own unkeyed ones."""

    time: float
    domain: str
    payload: Hashable = None
    key_group: int | None = None


class TimerService:
    """The pending timers of one operator instance (a heap per domain, lazy deletion).
    ``on_processing_timer(at)`` is told of every processing-time timer registered, so the task
    running the operator knows when to wake without asking every operator after every record."""

    def __init__(self, on_processing_timer: Callable[[float], None] | None = None) -> None:
        self._pending: set[Timer] = set()
        self._heaps: dict[str, list[Timer]] = {PROCESSING_TIME: [], EVENT_TIME: []}
        self._on_processing_timer = on_processing_timer

    def __len__(self) -> int:
        return len(self._pending)

    def _register(self, timer: Timer) -> Timer:
        if timer not in self._pending:
            self._pending.add(timer)
            heapq.heappush(self._heaps[timer.domain], timer)
            if timer.domain == PROCESSING_TIME and self._on_processing_timer is not None:
                self._on_processing_timer(timer.time)
        return timer

    def register_processing_time(self, at: float, payload: Hashable = None, key: Hashable = None) -> Timer:
        """Fires once ``time.time() >= at``. Pass the ``key`` a keyed operator sets it for."""
        return self._register(Timer(float(at), PROCESSING_TIME, payload, _group(key)))

    def register_event_time(self, at: int, payload: Hashable = None, key: Hashable = None) -> Timer:
        """Fires once the watermark is ``>= at`` (no record with an event time below ``at`` is
        to come). Pass the ``key`` a keyed operator sets it for."""
        return self._register(Timer(int(at), EVENT_TIME, payload, _group(key)))

    def delete(self, timer: Timer) -> None:
        """Forgets a pending timer (nothing happens if it fired or was never registered)."""
        self._pending.discard(timer)

    def _peek(self, domain: str) -> Timer | None:
        heap = self._heaps[domain]
        while heap and heap[0] not in self._pending:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def next_processing_time(self) -> float | None:
        """When the earliest processing-time timer is due (None: there is none)."""
        first = self._peek(PROCESSING_TIME)
        return None if first is None else first.time

    def _due(self, domain: str, now: float) -> list[Timer]:
        due = []
        while (first := self._peek(domain)) is not None and first.time <= now:
            heapq.heappop(self._heaps[domain])
            self._pending.discard(first)
            due.append(first)
        return due

    def due_processing(self, now: float) -> list[Timer]:
        """Removes and returns the processing-time timers due at ``now``, earliest first."""
        return self._due(PROCESSING_TIME, now)

    def due_event(self, watermark: int) -> list[Timer]:
        """Removes and returns the event-time timers the watermark has reached, earliest first."""
        return self._due(EVENT_TIME, watermark)

    def snapshot(self) -> list[Timer]:
        return sorted(self._pending, key=lambda t: (t.time, t.domain, str(t.payload), -1 if t.key_group is None
                                                   else t.key_group))

    def restore(self, timers: list[Timer]) -> None:
        for timer in timers:
            self._register(timer)


def _group(key: Hashable) -> int | None:
    """The key group of a key (None for no key)."""
    if key is None:
        return None
    import numpy as np

    from .batch import StringColumn
    from .partition import key_groups

    column = StringColumn.from_strings([key]) if isinstance(key, str) else np.array([key])
    return int(key_groups(column)[0])

