"""Windows against hand-computed tables: each assigner, the lateness boundaries, late firings,
the late side output, session merges by late rows, early firings, end of input, salt, and the
same across a SIGKILL and restore.

One source instance, batches as given: after each batch the source's watermark is
max(ts so far) - B, so every table below follows from the rules in mpstream/windows.py."""

import numpy as np
import pytest

from conftest import wait_until

from mpstream import Pipeline, PlanError
from mpstream.testing import Kill, Once, TestingSource
from mpstream.windows import Global, Session, Sliding, Tumbling

MIN, MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


def rows(k, ts, v=None):
    ts = np.asarray(ts, np.int64)
    return {"k": np.full(len(ts), k), "ts": ts, "v": np.ones(len(ts), np.int64) if v is None else np.asarray(v)}


def run_windows(batches, assigner, *, bound=0, lateness=0, salt=0, parallelism=1, spec=None, late=True,
                checkpoint_dir=None, files=None, **aggregate):
    """(window rows as (k, start, end, count, pane) in emission order, late rows' ts, result);
    with ``files``, the rows (and late rows) also go to transactional CSV files there."""
    p = Pipeline(channel_capacity=1 << 16)
    result = (p.source("src", lambda: TestingSource(batches)).with_event_time("ts", max_out_of_orderness=bound)
              .key_by("k").window(assigner, allowed_lateness=lateness)
              .aggregate("w", spec or {"*": "count"}, parallelism=parallelism, salt=salt, **aggregate))
    result.collect("out")
    if files is not None:
        result.to_files("windows", files, transactional=True)
    if late:
        result.late.collect("late")
        if files is not None:
            result.late.to_files("late_files", files, transactional=True)
    options = {} if checkpoint_dir is None else {"checkpoint_dir": checkpoint_dir, "checkpoint_interval": 0.01,
                                                 "restart_backoff": 0.01}
    out = p.run(**options)
    o = out["out"]
    got = [] if not o.num_rows else list(zip(o["k"].tolist(), o["window_start"].tolist(), o["window_end"].tolist(),
                                             o["count"].tolist(), o["pane"].to_numpy().tolist()))
    late_ts = sorted(out["late"]["ts"].tolist()) if late and out["late"].num_rows else []
    return got, late_ts, out


def test_tumbling_windows_fire_when_the_watermark_passes_their_end():
    got, late, _ = run_windows([rows(1, [1, 5, 12]), rows(1, [3]), rows(1, [25])], Tumbling(10))
    assert got == [(1, 0, 10, 2, "on_time"), (1, 10, 20, 1, "on_time"), (1, 20, 30, 1, "on_time")]
    assert late == [3]  # W was 12 when it came: [0, 10) was closed


def test_an_offset_shifts_the_windows():
    got, _, _ = run_windows([rows(1, [4, 6, 16])], Tumbling(10, offset=5))
    assert got == [(1, -5, 5, 1, "on_time"), (1, 5, 15, 1, "on_time"), (1, 15, 25, 1, "on_time")]


def test_windows_far_from_the_origin_and_lateness_near_the_int64_limit_do_not_overflow():
    near = MAX - 25
    got, late, _ = run_windows([rows(1, [near, near + 20])], Tumbling(10), lateness=MAX)
    start = near - (near % 10)
    assert got == [(1, start, start + 10, 1, "on_time"), (1, start + 20, MAX, 1, "on_time")]
    assert late == []
    from mpstream import OperatorError

    with pytest.raises(OperatorError, match="operator 'w.split', event-time column 'ts': event time .* is within 20 "
                                            "of the smallest int64"):
        run_windows([rows(1, [MIN + 5])], Tumbling(10))


def test_lateness_boundaries_and_late_firings():
    """Tumbling(10), lateness 5: ts 2 at W=14 is in (end + L = 15 > 14): [0, 10) fires again
    at once; ts 3 at W=16 is past 15: late; a row exactly at end + lateness (W=15) is late."""
    got, late, _ = run_windows([rows(1, [1, 14]), rows(1, [2]), rows(1, [16]), rows(1, [3])], Tumbling(10),
                               lateness=5)
    assert got == [(1, 0, 10, 1, "on_time"), (1, 0, 10, 2, "late"), (1, 10, 20, 2, "on_time")]
    assert late == [3]
    got, late, _ = run_windows([rows(1, [1, 15]), rows(1, [2])], Tumbling(10), lateness=5)
    assert got == [(1, 0, 10, 1, "on_time"), (1, 10, 20, 1, "on_time")] and late == [2]


def test_without_a_late_output_late_rows_are_counted_per_operator():
    _, _, result = run_windows([rows(1, [1, 30]), rows(1, [2, 3]), rows(2, [4])], Tumbling(10), late=False)
    assert result.per_operator()["w.split"]["late_records_dropped"] == 3


def test_sliding_windows_and_a_row_late_for_only_some_of_its_windows():
    """Sliding(10, 5): ts 12 makes W=12; then ts 7 is late for [0, 10) (closed) but on time for
    [5, 15): it counts there, and goes to no late output."""
    got, late, _ = run_windows([rows(1, [12]), rows(1, [7])], Sliding(10, 5))
    assert got == [(1, 5, 15, 2, "on_time"), (1, 10, 20, 1, "on_time")] and late == []
    got, _, _ = run_windows([rows(1, [0, 1, 2, 3, 4, 5, 6])], Sliding(6, 2), spec={"v": "sum", "*": "count"})
    assert got == [(1, -4, 2, 2, "on_time"), (1, -2, 4, 4, "on_time"), (1, 0, 6, 6, "on_time"),
                   (1, 2, 8, 5, "on_time"), (1, 4, 10, 3, "on_time"), (1, 6, 12, 1, "on_time")]


def test_a_sliding_window_fires_again_when_a_late_row_reaches_it():
    got, late, _ = run_windows([rows(1, [1, 9]), rows(1, [25]), rows(1, [8])], Sliding(10, 5), lateness=20)
    # W=25 closed [0,10), [5,15), [10,20) ... ts 8 is in [0, 10) and [5, 15): both fire again
    assert [g for g in got if g[4] == "late"] == [(1, 0, 10, 3, "late"), (1, 5, 15, 2, "late")]
    assert late == []


def test_sessions_merge_including_merges_that_late_rows_cause():
    """Session(gap 5), lateness 20: [1, 8) fires at W=20; ts 11 makes [11, 16), complete already
    (late pane); then ts 7 and 15 bridge everything into [1, 25), which fires (late) at the end."""
    got, late, _ = run_windows([rows(1, [1, 3]), rows(1, [20]), rows(1, [11]), rows(1, [7, 15])], Session(5),
                               lateness=20)
    assert got == [(1, 1, 8, 2, "on_time"), (1, 11, 16, 1, "late"), (1, 1, 25, 6, "late")]
    assert late == []


def test_a_row_cannot_join_a_session_that_is_gone():
    """Session(gap 5), lateness 0: [0, 5) is gone at W=30; ts 3 (proto [3, 8)) is late."""
    got, late, _ = run_windows([rows(1, [0]), rows(1, [30]), rows(1, [3])], Session(5))
    assert got == [(1, 0, 5, 1, "on_time"), (1, 30, 35, 1, "on_time")] and late == [3]


def test_global_windows_fire_every_count_rows_of_a_key_and_at_the_end():
    batch = {"k": np.array([1, 2, 1, 1, 1, 2, 1]), "ts": np.arange(7), "v": np.array([1, 10, 2, 3, 4, 20, 5])}
    got, _, out = run_windows([batch], Global(3), spec={"v": "sum", "*": "count"}, late=False)
    sums = sorted(zip(out["out"]["k"].tolist(), out["out"]["v_sum"].tolist(), out["out"]["count"].tolist()))
    assert sums == [(1, 6, 3), (1, 9, 2), (2, 30, 2)]  # 1: [1, 2, 3] then [4, 5] at the end; 2: [10, 20]
    assert {(g[1], g[2]) for g in got} == {(MIN, MAX)}
    with pytest.raises(PlanError, match="count windows have no late rows"):
        Pipeline().from_arrays("s", {"k": np.arange(2)}).key_by("k").window(Global(2)).aggregate("w", {"*": "count"}).late


def test_early_firings_emit_the_changed_keys_of_open_windows():
    batches = [rows(1, [1, 2]), rows(1, [3]), rows(2, [4]), rows(1, [12])]
    got, _, _ = run_windows(batches, Tumbling(10), early_every=2, late=False)
    assert [g for g in got if g[4] == "early"] == [(1, 0, 10, 2, "early"), (1, 0, 10, 3, "early"),
                                                    (2, 0, 10, 1, "early")]
    assert [g for g in got if g[4] == "on_time"] == [(1, 0, 10, 3, "on_time"), (2, 0, 10, 1, "on_time"),
                                                      (1, 10, 20, 1, "on_time")]


def test_every_aggregate_and_datetime_timestamps():
    t0 = np.datetime64("2026-11-24T00:00:00", "ms")
    batch = {"k": np.array(["a", "a", "b"]), "ts": t0 + np.array([10, 990, 1500]).astype("timedelta64[ms]"),
             "v": np.array([1.5, 2.5, 4.0])}
    p = Pipeline()
    (p.source("src", lambda: TestingSource([batch])).with_event_time("ts").key_by("k").window(Tumbling(1000))
      .aggregate("w", {"v": ["sum", "min", "max", "mean"], "*": "count"}).collect("out"))
    out = p.run()["out"]
    assert out["window_start"].dtype == np.dtype("datetime64[ms]")
    got = sorted(zip(out["k"].to_numpy().tolist(), out["window_start"].tolist(), out["v_sum"].tolist(),
                     out["v_min"].tolist(), out["v_max"].tolist(), out["v_mean"].tolist(), out["count"].tolist()))
    second = (t0 + np.timedelta64(1000, "ms")).item()
    assert got == [("a", t0.item(), 4.0, 1.5, 2.5, 2.0, 2), ("b", second, 4.0, 4.0, 4.0, 4.0, 1)]


def test_a_window_process_function_gets_each_windows_rows():
    def top(key, start, end, window_rows):
        best = int(np.argmax(window_rows["v"]))
        return {"best_ts": window_rows["ts"][best:best + 1], "n": np.array([window_rows.num_rows])}

    p = Pipeline()
    (p.source("src", lambda: TestingSource([{"k": np.array([1, 1, 2, 1]), "ts": np.array([1, 3, 4, 15]),
                                             "v": np.array([5, 9, 1, 2])}]))
      .with_event_time("ts").key_by("k").window(Tumbling(10)).process("top", top).collect("out"))
    out = p.run()["out"]
    got = sorted(zip(out["k"].tolist(), out["window_start"].tolist(), out["best_ts"].tolist(), out["n"].tolist(),
                     out["pane"].to_numpy().tolist()))
    assert got == [(1, 0, 3, 2, "on_time"), (1, 10, 15, 1, "on_time"), (2, 0, 4, 1, "on_time")]


@pytest.mark.parametrize("assigner", [Tumbling(10), Sliding(10, 5), Session(4)])
def test_salted_windows_give_the_same_rows(assigner):
    batches = [rows(1, [1, 3, 12], [1, 2, 3]), rows(2, [5, 6], [4, 5]), rows(1, [11, 30], [6, 7]), rows(2, [2], [8])]
    spec = {"v": ["sum", "max"], "*": "count"}
    plain, plain_late, _ = run_windows(batches, assigner, bound=3, lateness=5, spec=spec)
    salted, salted_late, _ = run_windows(batches, assigner, bound=3, lateness=5, spec=spec, salt=3, parallelism=2)
    assert sorted(salted) == sorted(plain) and salted_late == plain_late


def test_end_of_input_fires_every_window_once_and_clears_lateness_only_windows():
    got, _, _ = run_windows([rows(1, [1, 25])], Tumbling(10), lateness=100)
    assert got == [(1, 0, 10, 1, "on_time"), (1, 20, 30, 1, "on_time")]  # [0, 10) not again at the end


def panes(got):
    """Per (key, window), its panes (count, timing) in the order they came out."""
    out = {}
    for k, start, end, count, pane in got:
        out.setdefault((k, start, end), []).append((count, pane))
    return out


@pytest.mark.parametrize("assigner", [Tumbling(10), Sliding(10, 5), Session(4), Global(2)])
def test_windows_are_the_same_after_a_sigkill_and_restore(tmp_path, assigner):
    """The source dies after checkpoints hold window state, late rows and closed windows: the
    output equals an undisturbed run's (one source, one channel: every window's panes, in
    order; keys within one firing may come in another order)."""
    store_dir = str(tmp_path / "chk")
    from mpstream.checkpoint import CheckpointStore
    from mpstream.testing import Stall

    store = CheckpointStore(store_dir)
    crash = Once(tmp_path, "crash")
    head = [rows(1, [1, 3]), rows(2, [4, 7]), rows(1, [12]), rows(1, [2]), rows(2, [21])]
    tail = [rows(1, [9, 25]), rows(2, [24]), rows(1, [40])]
    late = assigner.kind != "count"
    want = run_windows(head + tail, assigner, bound=2, lateness=6, late=late, files=tmp_path / "want")[:2]
    with pytest.warns(UserWarning, match="restarting"):
        got = run_windows(head + [Stall(lambda: len(store.complete()) >= 2), Kill(crash)] + tail, assigner, bound=2,
                          lateness=6, checkpoint_dir=store_dir, late=late, files=tmp_path / "got")[:2]
    assert crash.fired and panes(got[0]) == panes(want[0]) and got[1] == want[1]
    assert any(pane == "late" for *_, pane in want[0]) == late  # late firings are part of it
    for name in ["windows"] + (["late_files"] if late else []):  # the published files hold the same rows
        published = [[line for f in sorted((tmp_path / run).glob(f"{name}-0.*.csv"))
                      for line in f.read_text().splitlines()[1:]] for run in ("want", "got")]
        assert sorted(published[0]) == sorted(published[1]) and (published[0] or name == "late_files")


def mixed(pairs):
    """A batch of (key, ts) rows, v = 1."""
    k, ts = zip(*pairs)
    return {"k": np.array(k), "ts": np.array(ts, np.int64), "v": np.ones(len(k), np.int64)}


RESCALED_HEAD = [mixed([(1, 1), (2, 3), (3, 4), (4, 2)]), mixed([(5, 7), (1, 12), (6, 11)]),
                 mixed([(2, 2), (7, 21), (3, 14)]), mixed([(1, 5), (8, 18), (4, 13)])]
RESCALED_TAIL = [mixed([(5, 12), (6, 25)]), mixed([(1, 15), (2, 30), (8, 16)]), mixed([(3, 40), (7, 38)])]


@pytest.mark.parametrize("assigner, salt", [(Tumbling(10), 0), (Tumbling(10), 2), (Sliding(10, 5), 0), (Session(4), 0)])
def test_windows_stopped_with_a_checkpoint_resume_at_another_parallelism(tmp_path, assigner, salt):
    """Stopped while windows are open, fired within their lateness and rows were too late; the
    windows resume at parallelism 3 (key groups move) and get more rows, late ones included:
    both runs together emit what one undisturbed run at parallelism 2 does, to the collect
    sink and to the transactional files (with salt, the last pane of each window: which rows
    come in time for the on-time pane then depends on two channels' timing; and for sliding
    and session windows, whether a row joins a window past its lateness the window operator
    still keeps, so those run unsalted: see the README's determinism notes)."""
    from mpstream.checkpoint import CheckpointStore
    from mpstream.testing import Stall

    reached, gate = Once(tmp_path, "reached"), Once(tmp_path, "gate")

    def job(parallelism, items, files):
        p = Pipeline(channel_capacity=1 << 16)
        result = (p.source("src", lambda: TestingSource(items)).with_event_time("ts", max_out_of_orderness=2)
                  .key_by("k").window(assigner, allowed_lateness=6)
                  .aggregate("w", {"v": "sum", "*": "count"}, parallelism=parallelism, salt=salt))
        result.collect("out", parallelism=2)
        result.to_files("windows", files, transactional=True, parallelism=2)  # a sink keeps its parallelism
        result.late.collect("late")
        return p

    def table(*results):
        got = [r for res in results if res["out"].num_rows for r in zip(
            *(res["out"][c].tolist() for c in ("k", "window_start", "window_end", "count")),
            res["out"]["pane"].to_numpy().tolist())]
        late = sorted(t for res in results if res["late"].num_rows for t in res["late"]["ts"].tolist())
        windows = {w: sorted(p) for w, p in panes(got).items()}  # 3 -> 2 sink instances: no order
        if salt:  # two partial instances feed the window: a row may make its pane on time or late
            assert all([pane for _, pane in p].count("on_time") <= 1 for p in windows.values())
            windows = {w: max(p)[0] for w, p in windows.items()}  # the last pane: all of the window's rows
        return windows, late

    def published(directory):
        return sorted(line for f in directory.glob("windows-*.csv") for line in f.read_text().splitlines()[1:])

    want = job(2, RESCALED_HEAD + RESCALED_TAIL, tmp_path / "want").run()
    chk = str(tmp_path / "chk")
    stall = Stall(lambda: (reached(), gate.fired)[1])
    running = job(2, RESCALED_HEAD + [stall] + RESCALED_TAIL, tmp_path / "got").start(checkpoint_dir=chk,
                                                                                     checkpoint_interval=0.02)
    wait_until(lambda: reached.fired, timeout=60, what="the source at its stall")
    running.stop()
    first = running.wait()
    assert first.stopped and first.stopped_at["src"] == [len(RESCALED_HEAD)]
    gate()
    second = job(3, RESCALED_HEAD + [stall] + RESCALED_TAIL, tmp_path / "got").run(checkpoint_dir=chk, resume=True)
    assert table(first, second) == table(want)
    if not salt:
        assert published(tmp_path / "got") == published(tmp_path / "want") != []
    if assigner.kind == "panes" and not salt:  # the data has late firings, for tumbling windows too-late rows
        assert any(pane == "late" for w in table(want)[0].values() for _, pane in w)
        assert table(want)[1] or not isinstance(assigner, Tumbling)
    assert CheckpointStore(chk).complete()


def test_window_arguments_are_checked():
    keyed = Pipeline().from_arrays("s", {"k": np.arange(3), "ts": np.arange(3)}).with_event_time("ts").key_by("k")
    with pytest.raises(PlanError, match="a tumbling window's size must be a positive int"):
        Tumbling(0)
    with pytest.raises(PlanError, match="slide \\(20\\) is larger than its size"):
        Sliding(10, 20)
    with pytest.raises(PlanError, match="allowed_lateness must be an int >= 0"):
        keyed.window(Tumbling(10), allowed_lateness=-1)
    with pytest.raises(PlanError, match="count windows need every row of a key in order"):
        keyed.window(Global(5)).aggregate("w", {"*": "count"}, salt=3)


# ---- properties against a plain-Python reference ------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FEW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def streams(seed, instances, disorder, stragglers):
    """Per source instance: batches of (k, ts, v), time roughly increasing with random disorder
    and a share of stragglers much later than the bound."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(instances):
        n = int(rng.integers(20, 120))
        ts = np.sort(rng.integers(0, 400, n)) + rng.integers(-disorder, disorder + 1, n)
        late = rng.random(n) < stragglers
        ts[late] -= rng.integers(30, 150, int(late.sum()))
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(6, n - 1), replace=False))
        rows_ = {"k": rng.integers(0, 4, n), "ts": ts, "v": rng.integers(-5, 20, n)}
        parts.append([{c: col[a:b] for c, col in rows_.items()} for a, b in zip([0, *cuts], [*cuts, n])])
    return parts


def reference(parts, assigner, bound, lateness):
    """(final (sum, count) per (key, start, end), sorted late ts): rows late by their own source
    instance's watermark before their batch (every window's end + lateness <= it) are late."""
    accepted, late = [], []
    for batches in parts:
        top = None
        for b in batches:
            watermark = None if top is None else top - bound
            for k, t, v in zip(b["k"].tolist(), b["ts"].tolist(), b["v"].tolist()):
                last_end = (t // assigner.slide) * assigner.slide + assigner.size if assigner.kind == "panes" \
                    else t + assigner.gap
                (late if watermark is not None and last_end + lateness <= watermark else accepted).append((k, t, v))
            if len(b["ts"]):
                top = max(top if top is not None else -10**9, int(b["ts"].max()))
    windows = {}
    if assigner.kind == "panes":
        for k, t, v in accepted:
            s = (t // assigner.slide) * assigner.slide
            while s > t - assigner.size:
                acc = windows.setdefault((k, s, s + assigner.size), [0, 0])
                acc[0] += v
                acc[1] += 1
                s -= assigner.slide
    else:
        for k in {r[0] for r in accepted}:
            current = None
            for t, v in sorted((t, v) for kk, t, v in accepted if kk == k):
                if current and t <= current[1]:
                    current[1] = max(current[1], t + assigner.gap)
                    current[2] += v
                    current[3] += 1
                else:
                    if current:
                        windows[(k, current[0], current[1])] = current[2:]
                    current = [t, t + assigner.gap, v, 1]
            windows[(k, current[0], current[1])] = current[2:]
    return {key: tuple(acc) for key, acc in windows.items()}, sorted(t for _, t, _ in late)


def run_parts(parts, assigner, bound, lateness, parallelism, salt):
    p = Pipeline(channel_capacity=1 << 16)
    result = (p.source("src", lambda: TestingSource(*parts), parallelism=len(parts))
              .with_event_time("ts", max_out_of_orderness=bound).key_by("k").window(assigner, allowed_lateness=lateness)
              .aggregate("w", {"v": "sum", "*": "count"}, parallelism=parallelism, salt=salt))
    result.collect("out")
    result.late.collect("late")
    out = p.run()
    final = {}
    o = out["out"]
    if o.num_rows:
        for k, s, e, total, count in zip(*(o[c].tolist() for c in ("k", "window_start", "window_end", "v_sum",
                                                                    "count"))):
            final[(k, s, e)] = (total, count)  # a key's panes come in order: the last is final
    late = sorted(out["late"]["ts"].tolist()) if out["late"].num_rows else []
    return final, late


@FEW
@given(seed=st.integers(0, 2**31), instances=st.integers(1, 3), parallelism=st.integers(1, 3),
       salt=st.sampled_from([0, 3]), lateness=st.sampled_from([0, 25]))
def test_tumbling_windows_with_disorder_and_stragglers_match_the_reference(seed, instances, parallelism, salt, lateness):
    parts = streams(seed, instances, disorder=10, stragglers=0.1)
    assert run_parts(parts, Tumbling(50), 15, lateness, parallelism, salt) == reference(parts, Tumbling(50), 15,
                                                                                        lateness)


@FEW
@given(seed=st.integers(0, 2**31), instances=st.integers(1, 3), parallelism=st.integers(1, 3),
       salt=st.sampled_from([0, 3]), assigner=st.sampled_from([Sliding(60, 20), Sliding(50, 10), Session(15)]))
def test_sliding_and_session_windows_match_the_reference(seed, instances, parallelism, salt, assigner):
    parts = streams(seed, instances, disorder=10, stragglers=0.0)  # within the bound: nothing is late
    assert run_parts(parts, assigner, 25, 0, parallelism, salt) == reference(parts, assigner, 25, 0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), lateness=st.sampled_from([0, 40]), keys=st.sampled_from([3, 100_000]),
       stragglers=st.sampled_from([0.0, 0.2]),
       assigner=st.sampled_from([Sliding(60, 5), Sliding(30, 20), Sliding(40, 10, offset=3), Sliding(9, 3),
                                 Tumbling(10)]))
def test_every_pane_a_window_state_emits_matches_a_brute_force_sum(seed, lateness, keys, stragglers, assigner):
    """The window state alone (no processes), row by row: every on-time and late pane it emits
    holds exactly the rows added so far in its window (sliding windows are combined from
    folds of panes, which late rows and new keys must renew), and on-time panes come for
    exactly the windows with rows that the watermark closes."""
    from mpstream.aggregate import parse_spec
    from mpstream.batch import Batch
    from mpstream.windows import PaneWindows

    rng = np.random.default_rng(seed)
    state = PaneWindows(assigner, "k", parse_spec({"v": ["sum", "min", "max"], "*": "count"}), lateness)
    added = np.zeros((0, 3), np.int64)  # (k, ts, v)

    def starts(t):
        last = (t - assigner.offset) // assigner.slide * assigner.slide + assigner.offset
        return range(last, t - assigner.size, -assigner.slide)

    def check(batches, pane):
        for b in batches:
            assert set(b["pane"].to_numpy().tolist()) == {pane}
            for k, s, e, total, low, high, count in zip(*(b[c].tolist() for c in (
                    "k", "window_start", "window_end", "v_sum", "v_min", "v_max", "count"))):
                mine = added[(added[:, 0] == k) & (added[:, 1] >= s) & (added[:, 1] < e)]
                assert e - s == assigner.size and (s - assigner.offset) % assigner.slide == 0
                assert (total, low, high, count) == (mine[:, 2].sum(), mine[:, 2].min(), mine[:, 2].max(), len(mine))

    cursor, watermark = 0, MIN
    for _ in range(25):
        n = int(rng.integers(0, 60 if keys < 10 else 300))
        ts = cursor + rng.integers(-15, 10, n) - (rng.random(n) < stragglers) * rng.integers(0, 80, n)
        if watermark != MIN:  # what the split lets through: rows with a window open or within the lateness
            ts = ts[np.array([max(starts(int(t))) + assigner.size + lateness > watermark for t in ts], bool)]
        k = rng.integers(0, keys, len(ts))  # a few keys (windows with every key) or many (the table widens)
        values = rng.integers(-50, 50, len(ts))
        added = np.concatenate([added, np.stack([k, ts, values], axis=1)])
        check(state.add(Batch({"k": k, "ts": ts, "v": values}), ts, partial=False), "late")
        cursor += int(rng.integers(0, 40))
        new = max(watermark, cursor - 15)
        fired = state.fire(new)
        check(fired, "on_time")
        closed = {(int(k), s) for k, t in added[:, :2].tolist() for s in starts(int(t))
                  if watermark < s + assigner.size <= new}
        assert {(k, s) for b in fired for k, s in zip(b["k"].tolist(), b["window_start"].tolist())} == closed
        watermark = new


def test_the_readme_event_time_example_gives_its_table():
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## Event time: watermarks and windows\n\n```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(code, scope)
    w, late = scope["r"]["windows"], scope["r"]["too_late"]
    got = list(zip(w["user"].tolist(), w["window_start"].tolist(), w["window_end"].tolist(), w["bytes_sum"].tolist(),
                   w["count"].tolist(), w["pane"].to_numpy().tolist()))
    assert got == [(1, 0, 60000, 30, 2, "on_time"), (2, 60000, 120000, 30, 1, "on_time"),
                   (1, 60000, 120000, 60, 1, "late"), (1, 120000, 180000, 40, 1, "on_time")]
    assert late["user"].tolist() == [2] and late["ts"].tolist() == [2000]


@pytest.mark.parametrize("salt", [0, 2])
def test_a_salted_aggregate_of_the_late_side_output_counts_the_late_rows(salt):
    """Rows at 200, 300 and 400 come after the watermark passed their window's end (1000):
    late rows of key 1: one, of key 2: two (by hand). Salted, the combiner reads the side
    output too, not the windows."""
    p = Pipeline()
    src = p.from_arrays("src", {"k": np.array([1, 1, 2, 1, 2, 2]), "ts": np.array([100, 5000, 200, 300, 9000, 400])},
                        batch_size=1).with_event_time("ts")
    windows = src.key_by("k").window(Tumbling(1000)).aggregate("win", {"*": "count"})
    windows.collect("windows")
    windows.late.key_by("k").aggregate("late_count", {"*": "count"}, salt=salt).collect("late_counts")
    counts = p.run()["late_counts"]
    assert sorted(zip(counts["k"].tolist(), counts["count"].tolist())) == [(1, 1), (2, 2)]
