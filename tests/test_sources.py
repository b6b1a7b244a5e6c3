"""In-memory columns (``from_arrays``): the instances of the source share its batches
(:class:`mpstream.sources.Units`) and restore from the positions of all of them, at any
parallelism, so a replay gives every row once."""

import itertools

import numpy as np
import pytest
from conftest import die_once_units_are_checkpointed

from mpstream import Batch, Pipeline, SourceError, WorkerDiedError, sources
from mpstream.operators import Context, Operator

ROWS = np.arange(10_000)


def instances(parallelism, data=ROWS, batch_size=100):
    """Instances of one source sharing one counter, as the coordinator's is shared."""
    claim = itertools.count().__next__
    out = []
    for i in range(parallelism):
        source = sources.ColumnsSource(Batch({"x": data}), batch_size)
        source.open(Context("src", i, parallelism, claim=claim))
        out.append(source)
    return out


def drain(source):
    out = []
    while True:
        try:
            out.append(source.poll())
        except StopIteration:
            return out


def rows(batches):
    return sorted(np.concatenate([b["x"] for b in batches]).tolist())


def test_instances_take_the_next_batch_nobody_took():
    a, b = instances(2)
    head = [a.poll() for _ in range(3)]
    assert [x["x"][0] for x in head] == [0, 100, 200]  # a took units 0, 1, 2
    rest = drain(b)  # b takes every unit left: a is "slow"
    assert rest[0]["x"][0] == 300 and len(rest) == 97
    assert drain(a) == []
    assert rows(head + rest) == ROWS.tolist()
    assert (a.snapshot()["done"], len(b.snapshot()["done"])) == ([0, 1, 2], 97)


def test_positions_restore_into_another_parallelism_and_back(monkeypatch):
    """Units of several batches, so positions fall inside units: two instances read a while,
    their positions go to three (rescaled), which read a little and go back to two."""
    monkeypatch.setattr(sources, "MAX_UNITS", 8)  # 100 batches: units of 13 batches
    a, b = instances(2)
    head = [a.poll() for _ in range(5)] + [b.poll() for _ in range(2)]
    states = [a.snapshot(), b.snapshot()]
    assert states[0]["unit"] == 0 and states[0]["rows"] == 500 and states[1]["rows"] == 200  # inside units
    three = instances(3)
    for source in three:
        source.ctx.rescaled = True
        source.restore(states)
    middle = [source.poll() for source in three]  # the two units in hand, and the next of the pool
    assert sorted(m["x"][0] for m in middle) == [500, 1500, 2600]
    two = instances(2)
    for source in two:
        source.ctx.rescaled = True
        source.restore([source_.snapshot() for source_ in three])
    assert rows(head + middle + [x for source in two for x in drain(source)]) == ROWS.tolist()


def test_a_restore_at_the_same_parallelism_goes_on_where_each_was():
    a, b = instances(2)
    head = [a.poll(), b.poll(), a.poll()]
    states = [a.snapshot(), b.snapshot()]
    again = instances(2)
    for source in again:
        source.restore(states)
    nxt = again[1].poll()
    assert nxt["x"][0] == 300  # units 0-2 were read: the pool goes on at 3
    assert rows(head + [nxt] + drain(again[0]) + drain(again[1])) == ROWS.tolist()


def test_other_columns_than_the_checkpoint_s_are_refused():
    (a,) = instances(1)
    a.poll()
    (b,) = instances(1, data=np.arange(5000))
    with pytest.raises(SourceError, match=r"source 'src': its columns are not the ones of the checkpoint "
                                          r"\(10000 rows then, 5000 now"):
        b.restore([a.snapshot()])


def test_an_instance_without_rows_still_sends_the_schema():
    a, b = instances(2, data=np.arange(50))  # one batch: b gets none
    assert a.poll().num_rows == 50
    empty = b.poll()
    assert empty.num_rows == 0 and empty.schema == Batch({"x": np.arange(50)}).schema
    with pytest.raises(StopIteration):
        b.poll()


def test_a_killed_job_resumes_at_another_parallelism_exactly(tmp_path):
    """SIGKILLed once a checkpoint holds units done by both source instances, with no
    restart; resumed at parallelism 3, the sums per key equal numpy's."""
    chk = str(tmp_path / "chk")
    die, crash = die_once_units_are_checkpointed(tmp_path, chk)
    keys, values = np.arange(200_000) % 1000, np.arange(200_000, dtype=np.float64)

    def job(parallelism, fn):
        p = Pipeline(channel_capacity=1 << 16)
        (p.from_arrays("src", {"k": keys, "v": values}, parallelism=parallelism, batch_size=100).process("die", fn)
          .key_by("k").aggregate("sum", {"v": "sum"}, parallelism=parallelism).collect("out"))
        return p

    with pytest.raises(WorkerDiedError, match="operator 'src'"):
        job(2, die).run(checkpoint_dir=chk, checkpoint_interval=0.01, restarts=0)
    assert crash.fired
    resumed = job(3, Operator).run(checkpoint_dir=chk, resume=True)
    assert resumed.restored_from is not None
    out = resumed["out"]
    sums = np.zeros(1000)
    sums[out["k"]] = out["v_sum"]
    assert np.allclose(sums, np.bincount(keys, weights=values)) and len(out["k"]) == 1000


def test_a_structured_npy_is_shared_by_the_instances_slice_by_slice(tmp_path):
    """Strided fields and a str field, loaded in each worker: each instance converts the
    batches it reads, and the rows come once."""
    arr = np.zeros(5000, dtype=[("k", "i8"), ("name", "U8"), ("v", "f8")])
    arr["k"], arr["v"] = np.arange(5000), np.arange(5000) / 2
    arr["name"] = [f"n{i % 97}" for i in range(5000)]
    np.save(tmp_path / "a.npy", arr)
    p = Pipeline()
    p.from_numpy("src", str(tmp_path / "a.npy"), parallelism=2, batch_size=300).collect("out")
    out = p.run()["out"]
    order = np.argsort(out["k"])
    assert out["k"][order].tolist() == list(range(5000))
    assert out["name"].to_numpy()[order].tolist() == arr["name"].tolist()
    assert np.array_equal(out["v"][order], arr["v"])
