"""Benchmarks clean up what they create, on success and on failure (the suite-wide fixture in
conftest checks the temporary directory after every test), and their checks can fail."""

import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import checkpoint as bench_checkpoint  # noqa: E402


def test_the_checkpoint_benchmark_removes_its_checkpoints():
    rate, checkpoints = bench_checkpoint.throughput(batches=20, interval=0.01)
    assert rate > 0


def test_the_checkpoint_benchmark_removes_its_checkpoints_when_the_job_fails(monkeypatch):
    def failing_job(*args, **kwargs):
        raise RuntimeError("the job failed")

    monkeypatch.setattr(bench_checkpoint, "job", failing_job)
    with pytest.raises(RuntimeError, match="the job failed"):
        bench_checkpoint.throughput(batches=20, interval=0.01)
    with pytest.raises(RuntimeError, match="the job failed"):
        bench_checkpoint.recovery(batches=20, keys=1000)


def test_the_windows_benchmark_checks_every_row():
    import windows as bench_windows

    data = bench_windows.events(50_000, 300, 0.0)
    want = bench_windows.reference(data, "sliding_5", 300)
    bench_windows.run_mpstream(data, "sliding_5", 0, want, check=True)
    want.counts[np.flatnonzero(want.counts)[7]] += 1  # numpy "says" one window has a row more
    with pytest.raises(Exception, match="1 of .* rows differ from numpy"):
        bench_windows.run_mpstream(data, "sliding_5", 0, want, check=True)


def test_the_ingest_benchmark_checks_every_key(tmp_path):
    pytest.importorskip("pyarrow", reason="the ingest benchmark reads files through pyarrow")
    import ingest as bench_ingest

    data = bench_ingest.generate(20_000, str(tmp_path))
    want = bench_ingest.reference(data)
    job = bench_ingest.engines(data)["csv mpstream"]
    bench_ingest.timed(job, str(tmp_path), "mpstream", want)
    want.count[3] += 1  # numpy "says" one key has a row more
    with pytest.raises(AssertionError, match="mpstream: the result differs from numpy's"):
        bench_ingest.timed(job, str(tmp_path), "mpstream", want)


def test_the_keyed_agg_benchmark_checks_string_keys_and_its_contenders_against_numpy(monkeypatch):
    import keyed_agg as bench_keyed

    results, _ = bench_keyed.keyed_agg(30_000, repeats=1)  # every impl is checked against numpy inside
    assert set(results) == {"uniform", "hot", "str_uniform", "str_hot"}
    assert {"numpy", "mpstream_hash", "mpstream_salted"} <= set(results["str_hot"])
    installed = {lib for lib in ("duckdb", "polars") if importlib.util.find_spec(lib) and importlib.util.find_spec("pyarrow")}
    assert installed <= set(results["str_hot"]), "a contender installed did not run (in its own process)"
    wrong = bench_keyed.run_numpy_strings

    def off_by_one(keys, values):
        sums, counts = wrong(keys, values)
        counts[7] += 1
        return sums, counts

    monkeypatch.setattr(bench_keyed, "run_numpy", lambda keys, values: off_by_one(bench_keyed.DOMAINS[keys], values))
    with pytest.raises(AssertionError, match="wrong result"):
        bench_keyed.keyed_agg(30_000, repeats=1)
