"""A job's timeline: its counters board sampled about four times a second, kept in bounded
memory, with its checkpoints and restarts marked.

The coordinator adds a :class:`~mpstream.counters.JobCounters` snapshot every
:data:`SAMPLE_INTERVAL_S`, and the time of every checkpoint and restart as it happens. A task
that starts again after a restart counts from zero: what its earlier attempt had counted is
carried on (as Prometheus does for a counter reset), so replayed records count again. At :data:`MAX_SAMPLES` every other
sample is dropped and the interval doubles: a long job keeps its whole run at a coarser step.
``JobResult.timeline()`` gives the samples as columns, one row per sample and operator;
``mpstream plot`` draws them.

>>> from mpstream import Pipeline
>>> import numpy as np
>>> p = Pipeline()
>>> p.from_arrays("numbers", {"x": np.arange(1000)}).collect("out")
>>> t = p.run().timeline()
>>> list(t)  # doctest: +NORMALIZE_WHITESPACE
['seconds', 'operator', 'records_in', 'records_out', 'records_in_per_s', 'records_out_per_s', 'busy', 'idle',
 'backpressured']
>>> int(t["records_in"][t["operator"].to_numpy() == "out"][-1])  # the sink's records in, at the end
1000
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .batch import Batch
from .counters import JobCounters

__all__ = ["Timeline", "SAMPLE_INTERVAL_S", "MAX_SAMPLES"]

SAMPLE_INTERVAL_S = 0.25
MAX_SAMPLES = 2048
_FIELDS = ("records_in", "records_out", "busy_s", "idle_s", "backpressured_s")
COLUMNS = ("seconds", "operator", "records_in", "records_out", "records_in_per_s", "records_out_per_s", "busy", "idle",
           "backpressured")


class Timeline:
    """Samples of one job (see the module doc). ``started`` is the ``time.monotonic()`` at
    which the job started; ``checkpoints`` and ``restarts`` the seconds since then at which
    each checkpoint completed and each restart began."""

    def __init__(self, operators: list[str], started: float) -> None:
        self.operators = list(dict.fromkeys(operators))  # names, in the job's order
        self.started = started
        self.interval = SAMPLE_INTERVAL_S
        self.seconds: list[float] = []
        self.values: list[np.ndarray] = []  # per sample: operators x _FIELDS, summed over instances
        self.checkpoints: list[float] = []  # seconds at which each checkpoint completed
        self.restarts: list[float] = []
        self._raw: dict[tuple[str, int], tuple[float, np.ndarray]] = {}  # instance -> its attempt, counters
        self._carried: dict[tuple[str, int], np.ndarray] = {}  # what its earlier attempts counted

    def add(self, job: JobCounters, final: bool = False) -> None:
        """Adds a snapshot (skipped if it comes sooner than the interval after the one before,
        unless it is the ``final`` one)."""
        at = job.taken - self.started
        if self.seconds and at - self.seconds[-1] < self.interval * 0.9 and not final:
            return
        index = {name: i for i, name in enumerate(self.operators)}
        values = np.zeros((len(self.operators), len(_FIELDS)))
        for op in job.operators:
            key = (op.name, op.instance)
            before = self._raw.get(key)
            carried = self._carried.setdefault(key, np.zeros(len(_FIELDS)))
            if not op.started:  # not running (yet), or setting its words afresh: as it was
                raw = np.zeros(len(_FIELDS)) if before is None else before[1]
            else:
                raw = np.array([getattr(op, f) for f in _FIELDS], dtype=np.float64)
                if before is not None and before[0] != op.started:  # a new attempt: what the last counted stays
                    carried += before[1]
                self._raw[key] = (op.started, raw)
            values[index[op.name]] += carried + raw
        self.seconds.append(at)
        self.values.append(values)
        if len(self.seconds) > MAX_SAMPLES:
            self.seconds, self.values = self.seconds[::2], self.values[::2]
            self.interval *= 2

    def columns(self) -> dict[str, np.ndarray]:
        """One row per sample after the first and operator: the seconds since the job started,
        the operator, its records in and out so far, records per second in and out since the
        sample before, and the shares of that time its processes were busy, idle and
        backpressured. A restart's replayed records count again."""
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for i in range(1, len(self.seconds)):
            span = max(self.seconds[i] - self.seconds[i - 1], 1e-9)
            delta = np.maximum(self.values[i] - self.values[i - 1], 0.0)
            for j, name in enumerate(self.operators):
                times = delta[j, 2:]
                shares = times / times.sum() if times.sum() > 0 else np.zeros(3)
                values = (self.seconds[i], name, self.values[i][j, 0], self.values[i][j, 1], delta[j, 0] / span,
                          delta[j, 1] / span, *shares)
                for column, value in zip(COLUMNS, values):
                    out[column].append(value)
        types = {"operator": str, "records_in": np.int64, "records_out": np.int64}
        return {name: np.array(values, dtype=types.get(name, np.float64)) for name, values in out.items()}

    def batch(self) -> Batch:
        """:meth:`columns` as a Batch."""
        return Batch(self.columns())

    def to_json(self) -> dict[str, Any]:
        """The timeline as one JSON object (what ``mpstream plot`` reads)."""
        columns = self.columns()
        return {"columns": {name: values.tolist() for name, values in columns.items()},
                "checkpoints": self.checkpoints, "restarts": self.restarts}

    def save(self, path: str) -> None:
        """Writes ``{"timeline": to_json()}`` to path."""
        with open(path, "w") as f:
            json.dump({"timeline": self.to_json()}, f)
