"""pytest-benchmark suite for checkpoints (run: python -m pytest bench/): the keyed aggregation
with checkpoints every 0.25 s against the same job without, in the same process (through the
``mpstream_benchmark`` fixture of mpstream's pytest plugin: checkpoint figures in extra_info)."""

import pytest
from checkpoint import BACKPRESSURE_MODES, backpressured, job


@pytest.mark.parametrize("interval", [None, 0.25])
def test_keyed_aggregation_with_and_without_checkpoints(mpstream_benchmark, tmp_path, interval):
    options = {} if interval is None else {"checkpoint_dir": str(tmp_path), "checkpoint_interval": interval}
    result = mpstream_benchmark(lambda: job(1_000_000, 200), **options)
    assert result.per_operator()["agg"]["records_in"] == 2 * 200 * 65_536


@pytest.mark.parametrize("mode", list(BACKPRESSURE_MODES))
def test_checkpoints_under_backpressure(benchmark, mode):
    """Checkpoint durations (trigger to committed) of source -> map -> slow sink, full rings:
    aligned barriers wait for the rings to drain, unaligned ones overtake the records (from
    the start, or after 50 ms aligned)."""
    durations = benchmark.pedantic(backpressured, args=(mode, 100), rounds=1, iterations=1)
    benchmark.extra_info["checkpoint_s"] = durations
    assert durations
