"""pytest plugin (registered as ``mpstream`` in the ``pytest11`` entry points, so installing
mpstream enables it): fixtures for suites that run and time mpstream jobs.

``mpstream_benchmark(make_pipeline, **run_kwargs)`` runs a job under pytest-benchmark's
``benchmark`` fixture (rounds, warm-up and calibration as pytest-benchmark is configured), with
a fresh pipeline from ``make_pipeline()`` every round, and returns the last round's
:class:`~mpstream.result.JobResult`. Its figures go to ``benchmark.extra_info`` (so
``--benchmark-json`` keeps them and ``--benchmark-compare`` shows them): ``events_per_s`` (the
rows the sources produced, per second of the job), ``checkpoints`` (count, mean and max
duration) and per operator ``records_in``, ``records_out``, ``records_in_per_s`` and the
``busy``, ``idle`` and ``backpressured`` shares of its process's time.

``mpstream_no_leftovers`` fails the test that leaves a worker process, a shared-memory segment
or a temporary directory of mpstream's behind (and cleans them up).

Example (``tests/test_speed.py``)::

    import numpy as np
    from mpstream import Pipeline

    def job():
        p = Pipeline()
        p.from_arrays("src", {"k": np.arange(1_000_000) % 100}).key_by("k").aggregate(
            "counts", {"*": "count"}).to_callback("sink", lambda batch: None)
        return p

    def test_counting_speed(mpstream_benchmark, mpstream_no_leftovers):
        result = mpstream_benchmark(job)
        assert result.per_operator()["counts"]["records_out"] == 100
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .result import JobResult

__all__ = ["benchmark_info", "mpstream_benchmark", "mpstream_no_leftovers"]


def benchmark_info(result: JobResult) -> dict[str, Any]:
    """The figures of a job that ``mpstream_benchmark`` puts in ``benchmark.extra_info``."""
    seconds = max(result.seconds, 1e-9)
    rows = result.per_operator()
    events = sum(rows[name]["records_out"] for name in result.stopped_at)  # the sources'
    operators = {}
    for name, row in rows.items():
        total = row["busy_s"] + row["idle_s"] + row["backpressured_s"]
        shares = {what: (round(row[f"{what}_s"] / total, 4) if total else 0.0)
                  for what in ("busy", "idle", "backpressured")}
        operators[name] = {"records_in": row["records_in"], "records_out": row["records_out"],
                           "records_in_per_s": round(row["records_in"] / seconds), **shares}
    durations = [c["duration_s"] for c in result.checkpoints]
    return {"events_per_s": round(events / seconds), "seconds": round(result.seconds, 6), "operators": operators,
            "checkpoints": {"count": len(durations),
                            "mean_s": round(sum(durations) / len(durations), 6) if durations else None,
                            "max_s": round(max(durations), 6) if durations else None}}


@pytest.fixture
def mpstream_benchmark(request: pytest.FixtureRequest) -> Callable[..., JobResult]:
    """``mpstream_benchmark(make_pipeline, **run_kwargs) -> JobResult`` (see the module doc)."""
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        pytest.fail("mpstream_benchmark needs pytest-benchmark: pip install pytest-benchmark", pytrace=False)

    def run(make_pipeline: Callable[[], Any], **run_kwargs: Any) -> JobResult:
        last: list[JobResult] = []

        def one_round() -> None:
            last[:] = [make_pipeline().run(**run_kwargs)]

        benchmark(one_round)
        benchmark.extra_info.update(benchmark_info(last[0]))
        return last[0]

    return run


@pytest.fixture
def mpstream_no_leftovers() -> Iterator[None]:
    """Fails the test that leaves a worker process, a /dev/shm segment or a temporary
    directory of mpstream's behind (:func:`mpstream.testing.no_leaks`)."""
    from .testing import no_leaks

    with no_leaks():
        yield
