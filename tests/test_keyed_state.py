"""Keyed state lives in key groups: ranges of groups per instance, snapshots redistributed to
another parallelism, a stateful keyed operator in a pipeline."""

import numpy as np
import pytest

from mpstream import Batch, StringColumn
from mpstream import KeyedOperator, KeyedState
from mpstream.partition import KEY_GROUPS, HashPartitioner, groups_of_instance, instance_of, key_groups
from mpstream.pipeline import Pipeline


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 128])
def test_instances_own_contiguous_ranges_that_tile_all_key_groups(n):
    ranges = [groups_of_instance(i, n) for i in range(n)]
    assert [g for r in ranges for g in r] == list(range(KEY_GROUPS))
    for i, r in enumerate(ranges):
        assert all(instance_of(g, n) == i for g in r)


def test_hash_partitioner_routes_by_key_group():
    keys = np.arange(1000)
    b = Batch({"k": keys})
    np.testing.assert_array_equal(HashPartitioner("k").assign(b, 3), instance_of(key_groups(b["k"]), 3))


def test_snapshots_restore_at_another_parallelism():
    rng = np.random.default_rng(3)
    words = [f"user-{i}" for i in range(300)]
    groups = key_groups(StringColumn.from_strings(words))
    old = [KeyedState(groups_of_instance(i, 2)) for i in range(2)]
    for word, group in zip(words, groups):
        old[instance_of(int(group), 2)][word] = int(rng.integers(0, 100))
    want = dict(kv for s in old for kv in s.items())
    snapshots = [s.snapshot() for s in old]
    new = [KeyedState(groups_of_instance(i, 3)) for i in range(3)]
    for state in new:
        state.restore(snapshots)
    assert sum(len(s) for s in new) == len(want)
    for i, state in enumerate(new):
        for key, value in state.items():
            assert want[key] == value
            assert instance_of(int(key_groups(StringColumn.from_strings([key]))[0]), 3) == i


class RunningCount(KeyedOperator):
    """Emits (key, running count of the key) for every row."""

    def process(self, batch):
        keys = batch["k"].tolist()
        counts = []
        for key in keys:
            self.state[key] = self.state.get(key, 0) + 1
            counts.append(self.state[key])
        return {"k": batch["k"], "running": np.array(counts, np.int64)}


@pytest.mark.parametrize("parallelism", [1, 2, 4])
def test_a_keyed_operator_keeps_per_key_state_and_order(parallelism):
    keys = np.random.default_rng(parallelism).integers(0, 30, 3000)
    batches = [Batch({"k": chunk}) for chunk in np.array_split(keys, 17)]
    p = Pipeline(channel_capacity=1 << 20)
    p.from_batches("src", batches).key_by("k").process("count", RunningCount, parallelism=parallelism).collect("out")
    out = p.run()["out"]
    for k in np.unique(keys):
        running = out["running"][out["k"] == k]
        assert running.tolist() == list(range(1, int((keys == k).sum()) + 1))


def test_from_batches_and_round_robin_key_by():
    batches = [Batch({"k": np.arange(i * 10, i * 10 + 10)}) for i in range(6)]
    p = Pipeline(channel_capacity=1 << 20)
    p.from_batches("src", batches, parallelism=2).key_by("k", "round_robin").map("m", lambda b: b, parallelism=3).collect("out")
    assert sorted(p.run()["out"]["k"].tolist()) == list(range(60))


def test_a_snapshot_keeps_values_as_they_were_when_it_was_taken():
    from mpstream.state import KeyedState

    state = KeyedState(range(128))
    state["a.com"] = np.zeros(3)
    state["b.org"] = [1]
    snapshot = state.snapshot()
    state["a.com"][:] = 7  # changed in place after the barrier
    state["b.org"].append(2)
    restored = KeyedState(range(128))
    restored.restore([snapshot])
    assert restored["a.com"].tolist() == [0, 0, 0] and restored["b.org"] == [1]


def test_a_key_held_by_two_old_instances_is_refused_not_overwritten(tmp_path):
    """A KeyedOperator after rebalance() holds a key on every instance that saw it; at another
    parallelism one count would replace the other (silently wrong). The restore is refused,
    naming the operator."""
    from mpstream import RestoreError
    from mpstream.testing import TestingSource

    class Count(KeyedOperator):
        def process(self, batch):
            for key in batch["k"].tolist():
                self.state[key] = self.state.get(key, 0) + 1

        def close(self):
            keys = sorted(k for k, _ in self.state.items())
            return {"k": np.array(keys, np.int64), "n": np.array([self.state[k] for k in keys], np.int64)}

    def job(parallelism, unbounded=False):
        p = Pipeline()
        items = [{"k": np.array([7, 7, 8])} for _ in range(6)]
        p.source("src", lambda: TestingSource(items, items, unbounded=unbounded), parallelism=2).rebalance() \
         .process("count", Count, parallelism=parallelism).collect("out")
        return p

    chk, handle = str(tmp_path / "chk"), []
    handle.append(job(2, unbounded=True).start(checkpoint_dir=chk, checkpoint_interval=0.01,
                               progress=lambda info: info["rows"] >= 36 and handle and handle[0].stop()))
    assert handle[0].wait().stopped
    with pytest.raises(RestoreError, match="operator 'count' .*key [78] has state in more than one old instance"):
        job(3).run(checkpoint_dir=chk, resume=True)
