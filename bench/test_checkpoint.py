"""pytest-benchmark suite for checkpoints (run: python -m pytest bench/): the keyed aggregation
with checkpoints every 0.25 s against the same job without, in the same process."""

import tempfile

import pytest
from checkpoint import job


@pytest.mark.parametrize("interval", [None, 0.25])
def test_keyed_aggregation_with_and_without_checkpoints(benchmark, interval):
    def run():
        with tempfile.TemporaryDirectory(prefix="mps-bench-") as directory:
            options = {} if interval is None else {"checkpoint_dir": directory, "checkpoint_interval": interval}
            return job(1_000_000, 200).run(**options)

    result = benchmark.pedantic(run, rounds=2)
    benchmark.extra_info["checkpoints"] = len(result.checkpoints)
    assert result.per_operator()["agg"]["records_in"] == 2 * 200 * 65_536
