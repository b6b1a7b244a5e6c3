"""pytest-benchmark suite for windows (run: python -m pytest bench/): each windowed aggregation
against the non-windowed aggregate over the same events, in the same process (see windows.py;
every job's rows are checked against numpy once before it is timed)."""

import pytest
from windows import JOBS, KEYS, events, reference, run_mpstream

N = 2_000_000


@pytest.fixture(scope="module", params=[0.0, 0.9], ids=["uniform", "hot"])
def data(request):
    return events(N, KEYS, request.param)


@pytest.mark.parametrize("job", JOBS)
def test_windowed_aggregation(benchmark, data, job):
    want = reference(data, job, KEYS)
    run_mpstream(data, job, 0, want, check=True)
    benchmark.pedantic(run_mpstream, args=(data, job, 0, want), rounds=3)
    benchmark.extra_info["events_per_s"] = N / benchmark.stats.stats.min
    benchmark.extra_info["rows_out"] = want.rows
