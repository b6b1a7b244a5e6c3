"""InputGate: several channels into one consumer, read fairly, blocking on all at once."""

import contextlib
import os
import signal
import threading

import numpy as np
import pytest

from mpstream import (Batch, Channel, ChannelError, ChannelReader, ChannelTimeoutError, ChannelWriter, InputGate,
                      PeerDiedError, RecordKind)


@contextlib.contextmanager
def channels(prefix: str, n: int, capacity: int):
    made = [Channel(f"{prefix}-{i}", capacity=capacity) for i in range(n)]
    try:
        yield made
    finally:
        for chan in made:
            chan.close()


def produce(name: str, channel: int, count: int) -> None:
    with ChannelWriter(name) as writer:
        for seq in range(count):
            writer.write(Batch({"channel": np.full(7, channel), "seq": np.full(7, seq)}))


def test_records_of_every_writer_arrive_in_order_per_channel(mp_context):
    counts = [300, 1, 120]
    with channels("gate", len(counts), 1 << 14) as chans:
        gate = InputGate([ChannelReader(c.name) for c in chans])
        children = [mp_context.Process(target=produce, args=(c.name, i, n)) for i, (c, n) in enumerate(zip(chans, counts))]
        for child in children:
            child.start()
        seen: dict[int, list[int]] = {i: [] for i in range(len(counts))}
        ends = []
        while not gate.done:
            index, record = gate.read(timeout=30)
            with record:
                if record.kind == RecordKind.END_OF_STREAM:
                    ends.append(index)
                else:
                    assert int(record.batch["channel"][0]) == index
                    seen[index].append(int(record.batch["seq"][0]))
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        assert seen == {i: list(range(n)) for i, n in enumerate(counts)}
        assert sorted(ends) == [0, 1, 2]
        gate.close()


def test_busy_channels_are_read_round_robin():
    with channels("fair", 3, 1 << 16) as chans:
        writers = [ChannelWriter(c.name) for c in chans]
        for i, writer in enumerate(writers):
            for seq in range(10):
                writer.write(Batch({"seq": np.array([seq])}))
        gate = InputGate([ChannelReader(c.name) for c in chans])
        order = []
        for _ in range(12):
            index, record = gate.read(timeout=5)
            with record:
                order.append((index, int(record.batch["seq"][0])))
        assert order == [(i % 3, i // 3) for i in range(12)]
        gate.close()
        for writer in writers:
            writer.close()


def _hang_after_attach(name: str, ready) -> None:
    ChannelWriter(name)
    ready.set()
    threading.Event().wait()


def test_a_dead_writer_among_several_is_named(mp_context):
    with channels("dead", 3, 1 << 12) as chans:
        gate = InputGate([ChannelReader(c.name) for c in chans])
        ready = mp_context.Event()
        child = mp_context.Process(target=_hang_after_attach, args=(chans[1].name, ready))
        child.start()
        assert ready.wait(30)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with pytest.raises(PeerDiedError, match=chans[1].name):
            gate.read(timeout=30)
        gate.close()


def test_gate_refuses_a_second_record_while_one_is_held():
    with channels("held", 2, 1 << 12) as chans:
        writers = [ChannelWriter(c.name) for c in chans]
        for writer in writers:
            writer.write(Batch({"x": np.arange(2)}))
        gate = InputGate([ChannelReader(c.name) for c in chans])
        _, record = gate.read(timeout=5)
        with pytest.raises(ChannelError, match="release the previous record"):
            gate.read(timeout=5)
        record.release()
        gate.read(timeout=5)[1].release()
        gate.close()
        for writer in writers:
            writer.close()


def test_read_with_timeout_zero_only_polls_and_a_short_one_times_out():
    with channels("poll", 2, 1 << 12) as chans:
        writers = [ChannelWriter(c.name) for c in chans]
        gate = InputGate([ChannelReader(c.name) for c in chans])
        with pytest.raises(ChannelTimeoutError):
            gate.read(0)  # nothing written yet
        writers[1].write(Batch({"x": np.arange(3)}))
        index, record = gate.read(0)
        assert index == 1 and record.batch["x"].tolist() == [0, 1, 2]
        record.release()
        with pytest.raises(ChannelTimeoutError):
            gate.read(0)
        with pytest.raises(ChannelTimeoutError):
            gate.read(1e-6)
        gate.close()
        for writer in writers:
            writer.close()
