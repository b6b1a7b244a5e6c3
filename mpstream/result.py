"""What a job returns: collected batches, per-operator statistics, checkpoints and restarts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .batch import Batch
from .metrics import InstanceStats
from .timeline import Timeline

__all__ = ["JobResult"]


@dataclass
class JobResult:
    """The outcome of a job.

    ``result[sink]`` is the concatenation of a collect sink's batches: with no rows it still
    has the columns and dtypes the job produced (none only if no batch ever reached the sink).
    It is made at the first ``result[sink]`` (a copy, owned and writable: 160 MB took 0.25-0.45 s
    on a VM's fresh memory), which replaces the batches in ``collected[sink]`` with it: later
    reads return that same batch.
    ``operators`` holds per-instance statistics (of the last attempt, after restarts);
    ``dropped`` the records each drop-policy operator shed; ``checkpoints`` one dict per
    committed checkpoint; ``recovery_seconds`` per restart the time from the failure until
    every worker ran again. A run that resumed from checkpoint ``restored_from`` started its
    sources at ``started_at`` (source name -> each instance's position). ``stopped`` is true for a job stopped with :meth:`JobHandle.stop`;
    ``stopped_at`` then says where each source instance stopped (its position), and
    ``final_checkpoint`` is the checkpoint a resumed run goes on from.
    """

    collected: dict[str, list[Batch]]
    operators: list[InstanceStats]
    seconds: float
    dropped: dict[str, int] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)
    running_at: list[float] = field(default_factory=list)  # time.monotonic() each attempt was running
    restored_from: int | None = None  # the checkpoint the run started from (resume=True)
    started_at: dict[str, list[Any]] = field(default_factory=dict)  # source -> each instance's position then
    stopped: bool = False
    final_checkpoint: int | None = None
    recording: Timeline | None = field(default=None, repr=False)  # the counters sampled while it ran

    @property
    def restarts(self) -> int:
        return len(self.recovery_seconds)

    @property
    def stopped_at(self) -> dict[str, list[Any]]:
        """source name -> the position (snapshot) of each instance where it ended or stopped."""
        out: dict[str, list[Any]] = {}
        for s in self.operators:
            if s.position is not None:
                out.setdefault(s.name, []).append(s.position)
        return out

    def processes(self) -> dict[str, list[str]]:
        """The operators that share a process (a chain), by the name of its first operator:
        ``{"clicks": ["clicks", "parse", "valid", "agg.combine"], "agg": ["agg", "csv"]}``."""
        out: dict[str, list[str]] = {}
        for s in self.operators:
            chain = out.setdefault(s.task.rsplit("[", 1)[0] or s.name, [])
            if s.name not in chain:
                chain.append(s.name)
        return out

    def timeline(self) -> Batch:
        """The job's counters over time (:mod:`mpstream.timeline`): per sample (about four a
        second) and operator, records per second in and out and the busy / idle /
        backpressured shares of its processes. ``save_timeline`` keeps it for ``mpstream plot``."""
        return self.recording.batch()

    def save_timeline(self, path: str) -> None:
        """Writes the timeline with its checkpoints and restarts as JSON (``mpstream plot`` input)."""
        self.recording.save(path)

    def __getitem__(self, sink: str) -> Batch:
        batches = self.collected[sink]
        if not batches:
            return Batch({})
        if len(batches) > 1 or not all(buffer.flags.writeable for buffer in batches[0].buffers()):
            batches[:] = [Batch.concat([b for b in batches if b.num_rows] or batches[:1])]  # a copy: the caller's
        return batches[0]

    def per_operator(self) -> dict[str, dict[str, float]]:
        """Statistics summed over the instances of each operator (numbers only)."""
        out: dict[str, dict[str, float]] = {}
        for s in self.operators:
            row = out.setdefault(s.name, {"instances": 0})
            row["instances"] += 1
            for k, v in {**asdict(s), **s.counters}.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("instance", "watermark"):
                    row[k] = row.get(k, 0) + v
        return out
