"""What an operator instance did: counters and times, reported when its task ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["InstanceStats"]


@dataclass
class InstanceStats:
    """One operator instance's statistics.

    Times are seconds of its task's wall clock: ``busy_s`` running operator code and copying,
    ``idle_s`` waiting for input, ``backpressured_s`` waiting for credit on an output;
    ``cpu_s`` is the CPU time of its process. Operators chained into one task (process) share
    those times: the head of the chain reports them, the others report only their counters.
    A source reports its ``position`` (its snapshot) where it ended or stopped, and
    ``start_position`` where it started when the job was restored from a checkpoint.
    ``watermark`` is the instance's event time when it ended (None without event time);
    ``counters`` what the operator counted (``late_records_dropped`` of a window).
    """

    name: str
    instance: int
    task: str = ""  # the task (process) that ran it: its head operator and instance
    records_in: int = 0
    records_out: int = 0
    batches_in: int = 0
    batches_out: int = 0
    bytes_out: int = 0
    dropped: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    backpressured_s: float = 0.0
    cpu_s: float = 0.0
    position: Any = None
    start_position: Any = None
    watermark: int | None = None
    counters: dict[str, int] = field(default_factory=dict)
