"""mpstream's pytest plugin (entry point pytest11 "mpstream"), in a pytest of its own: the
benchmark fixture times a fresh pipeline per round and keeps the job's figures in the JSON
report; the leftovers fixture fails a test that leaves a segment behind."""

import json

pytest_plugins = ["pytester"]

SUITE = """
import numpy as np
from mpstream import Pipeline

built = []

def job():
    built.append(1)
    p = Pipeline()
    (p.from_arrays("src", {"k": np.arange(1000) % 10}, parallelism=2).key_by("k")
      .aggregate("counts", {"*": "count"}).to_callback("sink", lambda batch: None))
    return p

def test_counting(mpstream_benchmark, mpstream_no_leftovers):
    result = mpstream_benchmark(job)
    assert result.per_operator()["counts"]["records_out"] == 10
    assert len(built) >= 2  # a fresh pipeline every round
"""


def test_the_benchmark_fixture_reports_the_job_per_round(pytester):
    pytester.makepyfile(test_speed=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-json=out.json",
                                           "--benchmark-min-rounds=3", "--benchmark-warmup=off")
    result.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "out.json").read_text())["benchmarks"][0]
    assert report["stats"]["rounds"] >= 3
    info = report["extra_info"]
    assert info["events_per_s"] > 0 and info["checkpoints"] == {"count": 0, "mean_s": None, "max_s": None}
    counts, src = info["operators"]["counts"], info["operators"]["src"]
    assert (counts["records_in"], counts["records_out"], src["records_out"]) == (1000, 10, 1000)
    assert abs(counts["busy"] + counts["idle"] + counts["backpressured"] - 1) < 1e-3


def test_the_leftovers_fixture_fails_a_test_that_leaves_a_segment(pytester):
    pytester.makepyfile(test_leak="""
def test_leaves_a_segment(mpstream_no_leftovers):
    open("/dev/shm/mps.plugin-test-leak", "w").close()
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # the fixture fails the test at teardown
    result.stdout.fnmatch_lines(["*left shared-memory segments:*mps.plugin-test-leak*"])
