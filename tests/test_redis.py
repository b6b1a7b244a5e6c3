"""Redis Streams against a real, private redis-server (started on a free port with its data in a
temporary directory, stopped after each test): the source reads every entry once through
SIGKILLs and restores, spread over instances, bounded or not; the sink writes every row once
through SIGKILLs; a Redis restart under a running job loses and duplicates nothing."""

import shutil
import socket
import subprocess

import numpy as np
import pytest

from conftest import wait_until

from mpstream import OperatorError, Pipeline
from mpstream.checkpoint import CheckpointStore
from mpstream.testing import Once, kill_me

redis = pytest.importorskip("redis", reason="the Redis connector needs redis-py: pip install 'mpstream[redis]'")
SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(SERVER is None, reason="redis-server is not installed (Debian package redis-server; "
                                                        ".ci/run installs it)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of this test: a free port, append-only persistence in a temp directory."""

    def __init__(self, directory):
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def up():
            try:
                return client.ping()
            except redis.ConnectionError:
                assert self.process.poll() is None, "redis-server exited"
                return False
        wait_until(up, timeout=20, what="redis-server to answer")

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.stop()


def fill(url, stream, n, start=0):
    client = redis.Redis.from_url(url)
    with client.pipeline() as p:
        for i in range(start, start + n):
            p.xadd(stream, {"id": i, "word": f"w{i % 7}"})
        p.execute()


def test_streams_are_spread_over_instances_and_read_once_up_to_their_end(server):
    for s, n in (("a", 2000), ("b", 1500), ("c", 10)):
        fill(server.url, s, n, start={"a": 0, "b": 10_000, "c": 20_000}[s])
    p = Pipeline()
    (p.from_redis("src", server.url, ["a", "b", "c"], parallelism=2, batch_size=300, until="latest",
                  schema={"id": "int64"}, id_column="entry").collect("out"))
    result = p.run()
    out = result["out"]
    assert sorted(out["id"].tolist()) == list(range(2000)) + list(range(10_000, 11_500)) + list(range(20_000, 20_010))
    assert list(out["word"]) == [f"w{i % 7}" for i in out["id"].tolist()] and out["entry"][0].count("-") == 1
    assert sorted(s.records_out for s in result.operators if s.name == "src") == [1500, 2010]


def test_the_source_reads_every_entry_once_across_a_sigkill(server, tmp_path):
    """An unbounded job copies a stream while entries keep coming; a worker is SIGKILLed once a
    checkpoint is committed; the copy ends up with every entry once."""
    chk = str(tmp_path / "chk")
    store, crash = CheckpointStore(chk), Once(tmp_path, "crash")

    def die_once_checkpointed(batch):
        if store.complete() and crash():
            kill_me()
        return batch

    p = Pipeline(channel_capacity=1 << 16)
    (p.from_redis("src", server.url, "events", batch_size=200, schema={"id": "int64"})
      .map("die", die_once_checkpointed).to_redis("sink", server.url, "copy"))
    job = p.start(checkpoint_dir=chk, checkpoint_interval=0.01)
    sent = 0
    client = redis.Redis.from_url(server.url)
    with pytest.warns(UserWarning, match="restarting"):
        while not crash.fired:
            fill(server.url, "events", 500, start=sent)  # entries keep coming until the kill
            sent += 500
        fill(server.url, "events", 500, start=sent)
        sent += 500
        wait_until(lambda: client.xlen("copy") >= sent, timeout=60, what="every entry copied")
        job.stop()
        job.wait()
    assert sorted(int(f[b"id"]) for _, f in client.xrange("copy")) == list(range(sent))


def test_the_sink_writes_every_row_once_across_sigkills(server, tmp_path):
    chk = str(tmp_path / "chk")
    store, crash = CheckpointStore(chk), Once(tmp_path, "crash")

    def rows(instance, offset):
        if store.complete() and crash():  # a source dies: the whole job restores, the sink too
            kill_me()
        if offset >= 200:  # then no rows, until the kill (so there is one), then the end
            return None if crash.fired else {"id": np.zeros(0, np.int64), "half": np.ma.MaskedArray(np.zeros(0))}
        ids = (instance * 200 + offset) * 50 + np.arange(50)
        return {"id": ids, "half": np.ma.MaskedArray(ids / 2, mask=ids % 10 == 0)}

    p = Pipeline(channel_capacity=1 << 16)
    p.from_generator("src", rows, parallelism=2).to_redis("sink", server.url, "out")
    with pytest.warns(UserWarning, match="restarting"):
        p.run(checkpoint_dir=chk, checkpoint_interval=0.01)
    entries = redis.Redis.from_url(server.url).xrange("out")
    ids = sorted(int(fields[b"id"]) for _, fields in entries)
    assert crash.fired and ids == list(range(20_000))  # every row once
    nulls = [fields for _, fields in entries if int(fields[b"id"]) % 10 == 0]
    assert all(b"half" not in f for f in nulls) and len(nulls) == 2000  # a null field is left out


def test_a_redis_restart_under_a_running_job_loses_and_duplicates_nothing(server, tmp_path):
    fill(server.url, "in", 5000)
    seen = Once(tmp_path, "first-rows")

    def mark(batch):
        seen()
        return batch

    p = Pipeline()
    (p.from_redis("src", server.url, "in", batch_size=100, schema={"id": "int64"}).map("mark", mark)
      .to_redis("sink", server.url, "copy"))
    job = p.start(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.05)
    wait_until(lambda: seen.fired, timeout=30, what="the first rows")
    server.stop()  # Redis goes away mid-job (its data is in the append-only file) and comes back
    server.start()
    fill(server.url, "in", 1000, start=5000)
    client = redis.Redis.from_url(server.url)
    wait_until(lambda: client.xlen("copy") >= 6000, timeout=60, what="every entry copied")
    job.stop()
    job.wait()
    ids = sorted(int(f[b"id"]) for _, f in client.xrange("copy"))
    assert ids == list(range(6000))


def test_an_unreachable_server_fails_the_job_naming_it(tmp_path):
    port = free_port()  # nothing listens here
    p = Pipeline()
    p.from_redis("src", f"redis://127.0.0.1:{port}/0", "x", retry_s=0.3).collect("out")
    with pytest.raises(Exception, match=f"Redis at redis://127.0.0.1:{port}/0 unreachable for 0.3 s"):
        p.run()


def test_a_lost_connection_is_retried_after_a_doubling_back_off():
    from mpstream.redis_streams import _Connection

    conn = _Connection(f"redis://127.0.0.1:{free_port()}/0", retry_s=60, where="source 'src'")
    waits = []
    for _ in range(9):
        assert conn.call(lambda r: r.ping()) is None  # away: the caller waits conn.wait, then tries again
        waits.append(conn.wait)
    assert waits == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0]


def test_a_stopped_job_resumes_at_another_parallelism(server, tmp_path):
    """Stop with a checkpoint at parallelism 1, resume at 2 (each instance takes the positions of
    its streams): every entry of both streams copied once."""
    chk = str(tmp_path / "chk")
    fill(server.url, "a", 700)
    fill(server.url, "b", 300, start=700)

    def job(parallelism, until):
        p = Pipeline()
        (p.from_redis("src", server.url, ["a", "b"], parallelism=parallelism, batch_size=100, until=until,
                      schema={"id": "int64"}).to_redis("sink", server.url, "copy", parallelism=parallelism))
        return p

    client = redis.Redis.from_url(server.url)
    first = job(1, None).start(checkpoint_dir=chk, checkpoint_interval=0.05)
    wait_until(lambda: client.xlen("copy") >= 1000, timeout=60, what="the first entries copied")
    first.stop()
    first.wait()
    fill(server.url, "a", 500, start=1000)
    fill(server.url, "b", 500, start=1500)
    job(2, "latest").run(checkpoint_dir=chk, resume=True)
    assert sorted(int(f[b"id"]) for _, f in client.xrange("copy")) == list(range(2000))


def test_the_readme_ingestion_example_reads_redis_as_it_reads_files(server, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow", reason="the example writes Parquet: pip install 'mpstream[arrow]'")
    from test_files import ORDERS, PER_CUSTOMER, per_customer_files, readme_block, write_orders

    client = redis.Redis.from_url(server.url)
    for stream, rows in (("orders-0", ORDERS[:3]), ("orders-1", ORDERS[3:])):
        for customer, qty, price in rows:
            client.xadd(stream, {"customer": customer, "qty": qty, "price": price})
    write_orders(tmp_path)
    monkeypatch.chdir(tmp_path)
    scope = {}
    heading = "## Connectors: files, Arrow, Redis Streams"
    exec(readme_block(heading, 0), scope)
    exec(readme_block(heading, 1).replace("redis://localhost:6379/0", server.url), scope)
    assert per_customer_files(tmp_path / "per_customer_redis") == per_customer_files(tmp_path / "per_customer")
    assert per_customer_files(tmp_path / "per_customer_redis") == PER_CUSTOMER


def test_a_second_run_of_the_same_job_writes_its_rows_too(server, tmp_path):
    """Epochs count again in every run: the marker of the first run must not make the second
    (fresh, not resumed) skip its epochs, with the same checkpoint directory or another."""
    client = redis.Redis.from_url(server.url)
    for run, chk in enumerate([tmp_path / "a", tmp_path / "a", tmp_path / "b"]):
        p = Pipeline()
        p.from_generator("src", lambda i, offset: {"id": np.arange(100) + 100 * offset} if offset < 10 else None) \
            .to_redis("sink", server.url, "out")
        p.run(checkpoint_dir=str(chk), checkpoint_interval=0.01)
        assert client.xlen("out") == 1000 * (run + 1)


def test_typed_fields_read_as_their_type_and_an_empty_one_is_null(server):
    client = redis.Redis.from_url(server.url)
    for flag, n in (("True", "1"), ("false", ""), ("0", "3"), ("1", "4")):
        client.xadd("typed", {"flag": flag, "n": n})
    p = Pipeline()
    p.from_redis("src", server.url, "typed", until="latest", schema={"flag": "bool", "n": "int64"}).collect("out")
    out = p.run()["out"]
    assert out["flag"].tolist() == [True, False, False, True] and out["n"].tolist() == [1, None, 3, 4]


def test_a_field_the_first_entries_did_not_have_is_an_error_asking_to_declare_it(server):
    client = redis.Redis.from_url(server.url)
    client.xadd("drift", {"a": "1"})
    client.xadd("drift", {"a": "2", "b": "x"})
    p = Pipeline()
    p.from_redis("src", server.url, "drift", until="latest", batch_size=1).collect("out")
    with pytest.raises(OperatorError, match=r"Redis entries bring field 'b', which the first entries did not have .*"
                                            r"declare every field with schema="):
        p.run()
    q = Pipeline()
    q.from_redis("src", server.url, "drift", until="latest", batch_size=1, schema={"b": "str"}).collect("out")
    out = q.run()["out"]
    assert [name for name, _ in out.schema] == ["b", "a"] and list(out["b"]) == [None, "x"]
