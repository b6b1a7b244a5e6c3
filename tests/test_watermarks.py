"""Watermarks: the valve (Flink's StatusWatermarkValve rules), the source generator (bounded
out-of-orderness, idleness on unblocked time), and watermarks and idleness through a job."""

import numpy as np
import pytest

from mpstream import Batch, Pipeline, SourceError
from mpstream.testing import Once, Stall, TestingSource
from mpstream.watermarks import EventTime, WatermarkGenerator, WatermarkValve
from mpstream.windows import Tumbling


def test_the_valve_emits_the_minimum_of_its_channels_when_it_grows():
    valve = WatermarkValve(3)
    assert valve.watermark(0, 10) is None and valve.watermark(1, 20) is None  # channel 2 holds it at -inf
    assert valve.watermark(2, 5) == 5
    assert valve.watermark(2, 3) is None  # a regression on a channel is dropped
    assert valve.watermark(2, 15) == 10
    assert valve.watermark(0, 12) == 12 and valve.watermark(0, 30) == 15
    assert valve.output == 15


def test_an_idle_channel_is_left_out_and_all_idle_emit_the_maximum_then_go_idle():
    valve = WatermarkValve(2)
    valve.watermark(0, 10)
    valve.watermark(1, 4)
    assert valve.status(1, idle=True) == (10, None)  # 1 held the minimum: 0 alone now
    assert valve.watermark(1, 50) is None  # an idle channel's watermark is ignored
    assert valve.watermark(0, 12) == 12
    assert valve.status(0, idle=True) == (None, True)  # every channel idle: the task goes idle
    assert valve.idle


def test_a_returning_channel_rejoins_only_once_it_has_caught_up():
    valve = WatermarkValve(2)
    valve.watermark(0, 10)
    valve.watermark(1, 10)
    valve.status(1, idle=True)
    assert valve.watermark(0, 100) == 100
    assert valve.status(1, idle=False) == (None, None)
    assert valve.watermark(1, 40) is None  # behind the output: it does not pull the watermark back
    assert valve.watermark(0, 120) == 120  # nor hold it
    assert valve.watermark(1, 110) is None  # still behind
    assert valve.watermark(1, 130) is None and valve.watermark(0, 140) == 130  # caught up: counts again


def test_every_channel_idle_then_one_returns_makes_the_task_active():
    valve = WatermarkValve(2)
    valve.status(0, idle=True)
    assert valve.status(1, idle=True) == (None, True)
    assert valve.status(0, idle=False) == (None, False)


def test_the_generator_emits_max_minus_the_bound_only_when_it_grows():
    gen = WatermarkGenerator(EventTime("ts", max_out_of_orderness=5), "source 's'")
    assert gen.on_batch(Batch({"ts": np.array([10, 30, 20])}), 0.0) == 25
    assert gen.on_batch(Batch({"ts": np.array([12])}), 0.0) is None  # out of order: no growth
    assert gen.on_batch(Batch({"ts": np.array([31])}), 0.0) == 26
    dates = WatermarkGenerator(EventTime("t", max_out_of_orderness=1000), "source 's'")
    ts = np.array(["2026-11-24T00:00:05"], "datetime64[ms]")
    assert dates.on_batch(Batch({"t": ts}), 0.0) == int(ts.view(np.int64)[0]) - 1000


def test_a_missing_or_mistyped_timestamp_is_an_error_naming_the_column():
    gen = WatermarkGenerator(EventTime("ts"), "source 'clicks'")
    with pytest.raises(SourceError, match=r"source 'clicks': the event-time column 'ts' is not in the batch"):
        gen.on_batch(Batch({"time": np.array([1])}), 0.0)
    with pytest.raises(SourceError, match=r"event-time column 'ts' has dtype float64"):
        gen.on_batch(Batch({"ts": np.array([1.5])}), 0.0)
    with pytest.raises(SourceError, match=r"event-time column 'ts' has NaT \(no timestamp\) at row 1"):
        gen.on_batch(Batch({"ts": np.array(["2026-11-24", "NaT"], "datetime64[ms]")}), 0.0)


def test_idleness_counts_only_time_not_blocked_on_credit(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("mpstream.watermarks.time.monotonic", lambda: now[0])
    gen = WatermarkGenerator(EventTime("ts", idle_timeout=1.0), "source 's'")
    gen.on_batch(Batch({"ts": np.array([1])}), blocked_s=0.0)
    now[0] += 5.0
    assert not gen.probe(blocked_s=4.5)  # 5 s since the last record, 4.5 of them waiting for credit
    now[0] += 0.6
    assert gen.probe(blocked_s=4.5)  # now 1.1 s unblocked: idle
    assert not gen.probe(blocked_s=4.5)  # said once


def test_a_source_with_nothing_to_read_is_idle_from_the_start_and_an_idle_timeout_releases_windows(tmp_path):
    """Instance 1 of the source has no partition (idle from the start); instance 0 sends rows,
    then nothing for a while (idle after 0.2 s). The window fires while both are idle: the
    job ends only once it saw the window's row."""
    fired = Once(tmp_path, "fired")
    items = [{"k": np.array([1, 1]), "ts": np.array([1, 5])}, {"k": np.array([1]), "ts": np.array([12])},
             Stall(lambda: fired.fired)]

    def seen(batch):
        if batch.num_rows:
            fired()

    p = Pipeline(channel_capacity=1 << 16)
    result = (p.source("src", lambda: TestingSource(items), parallelism=2)
              .with_event_time("ts", idle_timeout=0.2).key_by("k").window(Tumbling(10))
              .aggregate("w", {"*": "count"}, parallelism=2))
    result.to_callback("seen", seen)
    result.collect("out")
    out = p.run()["out"]
    rows = sorted(zip(out["window_start"].tolist(), out["count"].tolist(), out["pane"].to_numpy().tolist()))
    assert rows == [(0, 2, "on_time"), (10, 1, "on_time")]


def test_the_watermark_of_each_operator_is_in_its_statistics():
    p = Pipeline()
    (p.from_arrays("src", {"k": np.array([1, 2]), "ts": np.array([100, 300])}).with_event_time("ts")
      .key_by("k").window(Tumbling(1000)).aggregate("w", {"*": "count"}).collect("out"))
    stats = {s.name: s.watermark for s in p.run().operators}
    assert stats["src"] == np.iinfo(np.int64).max  # the end of the input
    assert stats["w"] == np.iinfo(np.int64).max


def test_with_event_time_goes_right_after_a_source():
    from mpstream import PlanError

    p = Pipeline()
    with pytest.raises(PlanError, match="with_event_time\\(\\) goes right after a source"):
        p.from_arrays("src", {"ts": np.arange(3)}).map("m", lambda b: b).with_event_time("ts")
    with pytest.raises(PlanError, match="time windows need event time"):
        p.from_arrays("s2", {"k": np.arange(3)}).key_by("k").window(Tumbling(10))


def test_a_restored_valve_is_idle_only_when_every_channel_is():
    """Saved idle, but a channel new since (another parallelism upstream) starts active at
    the output: the task is active again (it then says so downstream, see Task._announce)."""
    valve = WatermarkValve(2)
    valve.restore(50, [(70, True, False), None])
    assert not valve.idle and valve.channels[1].watermark == 50
    assert valve.watermark(1, 60) == 60  # the new channel alone moves the output
    idle = WatermarkValve(2)
    idle.restore(50, [(70, True, False), (50, True, False)])
    assert idle.idle
