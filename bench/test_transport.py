"""pytest-benchmark suite for the transport (run: python -m pytest bench/).

Each figure has its baseline measured in the same process: channel write+read of a batch
against np.copyto of the same bytes, and the channel's ping-pong against a Pipe's.
"""

import numpy as np
import pytest
from transport import SIZES, mp_pipe_latency, mpstream_latency, payload, touch

from mpstream import Batch, Channel, ChannelReader, ChannelWriter


@pytest.fixture(scope="module")
def channel():
    with Channel("bench-suite", capacity=1 << 23) as chan:
        writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
        yield writer, reader
        writer.close()
        reader.close()


@pytest.mark.parametrize("size", list(SIZES))
def test_channel_write_read(benchmark, channel, size):
    """One batch through a channel in one process: claim, copy, commit, peek, touch, release."""
    writer, reader = channel
    batch = Batch({"payload": payload(SIZES[size])})

    def once():
        writer.write(batch)
        with reader.read() as record:
            return touch(record.batch["payload"])

    assert benchmark(once) == touch(batch["payload"])


@pytest.mark.parametrize("size", list(SIZES))
def test_np_copyto_baseline(benchmark, size):
    """The same bytes copied by numpy and touched: the floor for the test above."""
    src, dst = payload(SIZES[size]), np.empty(SIZES[size] // 8, np.int64)

    def once():
        np.copyto(dst, src)
        return touch(dst)

    assert benchmark(once) == touch(src)


@pytest.mark.parametrize("impl", ["mpstream", "mp_pipe"])
def test_ping_pong_latency(benchmark, impl):
    """One-way latency of an 8-row batch between two processes (round trip / 2), in us."""
    measure = {"mpstream": mpstream_latency, "mp_pipe": mp_pipe_latency}[impl]
    samples = benchmark.pedantic(measure, args=(2000, 0), rounds=3)
    benchmark.extra_info["p50_us"] = float(np.percentile(samples, 50))
    assert len(samples) == 2000
