"""pytest-benchmark suite for windows (run: python -m pytest bench/): each windowed aggregation
against the non-windowed aggregate over the same events, in the same process, through the
``mpstream_benchmark`` fixture of mpstream's pytest plugin (see windows.py; every job's rows
are checked against numpy once before it is timed)."""

import pytest
from windows import JOBS, KEYS, check_rows, events, reference, run_mpstream, window_job

N = 2_000_000


@pytest.fixture(scope="module", params=[0.0, 0.9], ids=["uniform", "hot"])
def data(request):
    return events(N, KEYS, request.param)


@pytest.mark.parametrize("job", JOBS)
def test_windowed_aggregation(mpstream_benchmark, data, job):
    want = reference(data, job, KEYS)
    run_mpstream(data, job, 0, want, check=True)
    check_rows(mpstream_benchmark(lambda: window_job(data, job, 0, want)), job, want)
