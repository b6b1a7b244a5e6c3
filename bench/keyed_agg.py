"""Keyed aggregation benchmark: sum and count per key of 20M events (float64 value) in 64K-row
batches, keys uniform over 100K or hot (90% on one key), as int64 (DIST ``uniform``, ``hot``)
and as domain-like strings (``str_uniform``, ``str_hot``: "site-123.example.com"), all in one
run for:

    numpy            one process, np.bincount per batch into running totals (string keys:
                     np.unique's inverse, then bincount)
    mp_pool          multiprocessing.Pool(2): partial bincounts per chunk (int keys)
    mpstream_hash    source(2) -> key_by(key) -> aggregate(parallelism 2)
    mpstream_salted  source(2) -> key_by(key) -> aggregate(parallelism 2, salt 8): two-stage
    duckdb           SELECT key, sum(value), count(*) ... GROUP BY key, 2 threads (if installed)
    polars           group_by(key).agg(sum, len), 2 threads (if installed)

Every contender starts from its own native form of the same data, built before the clock
starts: numpy arrays, an mpstream Batch (strings as a StringColumn), an Arrow table for
DuckDB (zero-copy from the StringColumn: Arrow's large_string), a polars DataFrame. DuckDB,
polars and numpy's string grouping run in a process of their own (spawned per DIST, the same
events from the same seed, driven round by round with the others): their libraries and data
(an Arrow table, a DataFrame, 320 MB of numpy strings) would otherwise sit in this process,
and every fork of an mpstream job (or of mp_pool) pays for the memory of the process it forks
from (``bench/startup.py`` measures how much). Spawned, not forked: polars deadlocks in a
child forked from a process that ran polars.

plus the keyed edge alone (``shuffle``): the uniform int events, source(2) -> key_by(key) ->
a sink that drops them (parallelism 2), what hash-partitioning and moving the rows costs
without the aggregation; plus a CPU-heavy per-batch map (URL parsing in Python) at parallelism 1 and 2, beside the same
parsing in 1 and 2 plain forked processes (the machine's own scaling), and the cost
per row of hashing string keys and of the whole key lookup, in one process. "partitions"
lists the rows each instance of the keyed stage received: events for hash, partial rows (one
per key and combiner flush in each upstream instance) for salted.

    python bench/keyed_agg.py [--quick]      # --quick: 4M events, under 60 s

Every result is checked against numpy. The last line is one JSON object.
"""

from __future__ import annotations

import ctypes
import functools
import json
import multiprocessing
import os
import signal
import sys
import time
from urllib.parse import urlsplit

import numpy as np
from transport import best_of, machine_line, quick_option

from mpstream import Batch, StringColumn
from mpstream.pipeline import Pipeline
from mpstream.result import JobResult

os.environ.setdefault("POLARS_MAX_THREADS", "2")  # read when polars is imported

KEYS = 100_000
DISTS = ("uniform", "hot", "str_uniform", "str_hot")
BATCH = 65_536
SALT = 8
CTX = multiprocessing.get_context("fork")
_DATA: dict[str, np.ndarray] = {}  # the events, inherited by forked Pool workers


def events(n: int, dist: str, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Key codes (0 to KEYS - 1) and values; the string keys of a ``str_`` DIST are the codes'
    :func:`domains`."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, KEYS, n)
    if dist.endswith("hot"):
        keys[rng.random(n) < 0.9] = 42
    return keys, rng.standard_normal(n)


DOMAINS = np.array([f"site-{i}.example.com" for i in range(KEYS)])


_BY_NAME = np.argsort(DOMAINS)


def code_of(domains: np.ndarray) -> np.ndarray:
    """The key codes of domain strings (the inverse of DOMAINS), vectorised."""
    return _BY_NAME[np.searchsorted(DOMAINS[_BY_NAME], np.asarray(domains, dtype=DOMAINS.dtype))]


def run_numpy_strings(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's way to group by a string: np.unique's inverse per batch, then bincount."""
    sums, counts = np.zeros(KEYS), np.zeros(KEYS, np.int64)
    for lo in range(0, len(keys), BATCH):
        uniq, inverse = np.unique(keys[lo : lo + BATCH], return_inverse=True)
        codes = code_of(uniq)
        sums[codes] += np.bincount(inverse, weights=values[lo : lo + BATCH], minlength=len(uniq))
        counts[codes] += np.bincount(inverse, minlength=len(uniq))
    return sums, counts


def run_numpy(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = np.zeros(KEYS), np.zeros(KEYS, np.int64)
    for lo in range(0, len(keys), BATCH):
        k = keys[lo : lo + BATCH]
        sums += np.bincount(k, weights=values[lo : lo + BATCH], minlength=KEYS)
        counts += np.bincount(k, minlength=KEYS)
    return sums, counts


def _pool_chunk(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = bounds
    return run_numpy(_DATA["keys"][lo:hi], _DATA["values"][lo:hi])


def run_mp_pool(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _DATA.update(keys=keys, values=values)
    step = BATCH * 16
    try:
        with CTX.Pool(2) as pool:
            parts = pool.map(_pool_chunk, [(lo, min(lo + step, len(keys))) for lo in range(0, len(keys), step)])
    finally:
        _DATA.clear()  # not kept for the next impl's forks to copy
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def mpstream_job(keys: np.ndarray, values: np.ndarray, salt: int) -> Pipeline:
    p = Pipeline()
    (p.from_arrays("src", {"key": keys, "value": values}, parallelism=2, batch_size=BATCH)
      .key_by("key").aggregate("agg", {"value": "sum", "*": "count"}, parallelism=2, salt=salt)
      .collect("out"))
    return p


def run_mpstream(keys: np.ndarray, values: np.ndarray, salt: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    return mpstream_sums(mpstream_job(keys, values, salt).run())


def mpstream_sums(result: JobResult) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The sums and counts per key of a job's result, and the rows into its keyed stage."""
    out = result["out"]
    key = out["key"]
    codes = key if isinstance(key, np.ndarray) else code_of(key.to_numpy())
    sums, counts = np.zeros(KEYS), np.zeros(KEYS, np.int64)
    sums[codes] = out["value_sum"]
    counts[codes] = out["count"]
    partitions = [s.records_in for s in result.operators if s.name == "agg"]
    return sums, counts, partitions


def contenders(keys: StringColumn | np.ndarray, values: np.ndarray) -> dict:
    """DuckDB and polars over their native form of the data (those installed), in this
    process."""
    impls = {}
    try:
        import pyarrow as pa
    except ImportError:
        return impls
    table = Batch({"key": keys, "value": values}).to_arrow()
    try:
        import duckdb

        con = duckdb.connect(config={"threads": 2})
        con.register("events", table)

        def run_duckdb():
            out = con.execute("SELECT key, sum(value) AS s, count(*) AS c FROM events GROUP BY key").fetchnumpy()
            return out["key"], out["s"], out["c"]

        impls["duckdb"] = run_duckdb
    except ImportError:
        pass
    try:
        import polars as pl

        frame = pl.from_arrow(table)

        def run_polars():
            out = frame.group_by("key").agg(pl.col("value").sum().alias("s"), pl.len().alias("c"))
            return out["key"].to_numpy(), out["s"].to_numpy(), out["c"].to_numpy()

        impls["polars"] = run_polars
    except ImportError:
        pass
    return {impl: lambda fn=fn: _by_code(*fn()) for impl, fn in impls.items()}


#: The contenders' processes are spawned, not forked: polars deadlocks in a child forked from a
#: process that ran polars (its thread pool does not survive a fork), as a pytest session does
#: that runs bench/test_ingest.py first.
CONTENDER_CTX = multiprocessing.get_context("spawn")


class ContenderProcess:
    """The contenders of one DIST in a process of their own (see the module doc): numpy's
    string grouping (a ``str_`` DIST), DuckDB and polars (those installed), named by
    ``impls``; ``run(impl)`` times one there and returns ``(seconds, (sums, counts))``."""

    def __init__(self, n: int, dist: str) -> None:
        self.conn, theirs = CONTENDER_CTX.Pipe()
        self.process = CONTENDER_CTX.Process(target=_serve_contenders, args=(theirs, os.getpid(), n, dist),
                                             daemon=True)
        self.process.start()
        theirs.close()
        try:
            self.impls: list[str] = self.conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"the contenders' process of {dist} died as it started (exit code "
                               f"{self.process.exitcode}); its stderr says why") from None

    def run(self, impl: str) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
        self.conn.send(impl)
        return self.conn.recv()

    def close(self) -> None:
        """Ends the process, or kills it (it may have died, or hang in a contender)."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _serve_contenders(conn, parent: int, n: int, dist: str) -> None:
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: and dies with the bench even mid-run
    if os.getppid() != parent:  # the bench died while this process started
        os._exit(1)
    codes, values = events(n, dist)
    impls, keys = {}, codes
    if dist.startswith("str_"):
        names = DOMAINS[codes]  # numpy's native form of the keys
        impls["numpy"] = lambda: run_numpy_strings(names, values)
        keys = StringColumn.from_strings(names)
    impls |= contenders(keys, values)
    conn.send(list(impls))
    try:
        while (impl := conn.recv()) is not None:
            conn.send(timed(impls[impl]))
    except EOFError:  # the bench is gone
        pass


def _by_code(key: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = key.astype(np.int64) if key.dtype.kind in "iu" else code_of(np.asarray(key, dtype=str))
    out_sums, out_counts = np.zeros(KEYS), np.zeros(KEYS, np.int64)
    out_sums[codes], out_counts[codes] = sums, counts
    return out_sums, out_counts


def string_key_costs(n: int = 4_000_000) -> dict[str, float]:
    """Nanoseconds per row, one process, str_hot keys in 64K-row batches (best of 3): hashing
    a string key, and the whole key lookup (hash, key map insert, each new key's string)."""
    from mpstream.aggregate import KeyIndex
    from mpstream.partition import hash_column

    codes, _ = events(n, "str_hot")
    keys = StringColumn.from_strings(DOMAINS[codes])
    batches = [keys.slice(lo, lo + BATCH) for lo in range(0, n, BATCH)]
    costs = {"hash": float("inf"), "key_index": float("inf")}
    for _ in range(3):
        costs["hash"] = min(costs["hash"], timed(lambda: [hash_column(b) for b in batches])[0])
        index = KeyIndex("key")
        costs["key_index"] = min(costs["key_index"], timed(lambda: [index.slots(b) for b in batches])[0])
    return {what: round(seconds / n * 1e9, 2) for what, seconds in costs.items()}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def keyed_agg(n: int, repeats: int) -> tuple[dict, dict]:
    results: dict[str, dict[str, dict]] = {}
    partitions: dict[str, dict[str, list[int]]] = {}
    for dist in DISTS:
        codes, values = events(n, dist)
        want_sums, want_counts = run_numpy(codes, values)
        if dist.startswith("str_"):
            keys = StringColumn.from_strings(DOMAINS[codes])  # mpstream's native form of the keys
            impls = {}
        else:
            keys = codes
            impls = {"numpy": lambda: run_numpy(codes, values), "mp_pool": lambda: run_mp_pool(codes, values)}
        impls |= {"mpstream_hash": lambda: run_mpstream(keys, values, 0),
                  "mpstream_salted": lambda: run_mpstream(keys, values, SALT)}
        timers = {impl: functools.partial(timed, fn) for impl, fn in impls.items()}
        others = ContenderProcess(n, dist)
        timers |= {impl: functools.partial(others.run, impl) for impl in others.impls}
        best = dict.fromkeys(timers, float("inf"))
        partitions[dist] = {}
        try:
            for _ in range(repeats):  # round by round: a slow spell of the host hits every impl
                for impl, timer in timers.items():
                    seconds, out = timer()
                    best[impl] = min(best[impl], seconds)
                    assert np.allclose(out[0], want_sums) and (out[1] == want_counts).all(), \
                        f"{impl} {dist}: wrong result"
                    if len(out) == 3:
                        partitions[dist][impl] = out[2]
        finally:
            others.close()
        results[dist] = {impl: {"events_per_s": round(n / s), "seconds": round(s, 4)} for impl, s in best.items()}
        for impl, s in best.items():
            print(f"  {dist:8s} {impl:16s} {n / s / 1e6:8.2f} M events/s", file=sys.stderr)
    return results, partitions


URL_HOSTS = np.array([f"https://site-{i}.example.org/path/{i}?q={i}&ref=feed" for i in range(500)])


def parse_urls(batch: Batch) -> dict:
    """CPU-heavy per-batch work: every URL parsed in Python."""
    hosts = [urlsplit(u).hostname for u in batch["url"].to_numpy().tolist()]
    return {"host_len": np.fromiter((len(h) for h in hosts), np.int64, len(hosts))}


def url_batch(rows: int) -> Batch:
    return Batch({"url": StringColumn.from_strings(URL_HOSTS[np.arange(rows) % len(URL_HOSTS)])})


def cpu_map_job(rows: int, parallelism: int) -> Pipeline:
    p = Pipeline()
    (p.from_arrays("src", dict(url_batch(rows)), parallelism=parallelism, batch_size=4096)
      .map("parse", parse_urls, parallelism=parallelism)
      .to_callback("sink", lambda b: None))
    return p


def _parse_share(batch: Batch, lo: int, hi: int) -> None:
    for start in range(lo, hi, 4096):
        parse_urls(batch.slice(start, min(hi, start + 4096)))


def plain_processes(batch: Batch, parallelism: int) -> None:
    """The same parsing in parallelism forked processes, each a contiguous share of the URLs:
    what this machine gives two CPU-bound processes right now, the ceiling of cpu_map_job's
    scaling."""
    step = -(-batch.num_rows // parallelism)
    workers = [CTX.Process(target=_parse_share, args=(batch, i * step, min(batch.num_rows, (i + 1) * step)))
               for i in range(parallelism)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(w.exitcode == 0 for w in workers), f"a plain parsing process failed: {[w.exitcode for w in workers]}"


def shuffle_job(keys: np.ndarray, values: np.ndarray) -> Pipeline:
    p = Pipeline()
    (p.from_arrays("src", {"key": keys, "value": values}, parallelism=2, batch_size=BATCH)
      .key_by("key").to_callback("sink", lambda b: None, parallelism=2))
    return p


def check_shuffled(result: JobResult, n: int) -> None:
    got = result.per_operator()["sink"]["records_in"]
    assert got == n, f"the sink got {got} rows of {n}"


def main() -> None:
    quick = quick_option(__doc__, "4M events: under 60 s")
    n = 4_000_000 if quick else 20_000_000
    results, partitions = keyed_agg(n, repeats=2 if quick else 3)
    keys, values = events(n, "uniform")
    shuffle_s = best_of(3, {"shuffle": shuffle_job(keys, values).run}, lambda name, result: check_shuffled(result, n))["shuffle"]
    del keys, values
    rows = 100_000 if quick else 400_000
    urls = url_batch(rows)
    jobs = {**{f"mpstream_p{p}": cpu_map_job(rows, p).run for p in (1, 2)},
            **{f"plain_p{p}": functools.partial(plain_processes, urls, p) for p in (1, 2)}}
    best = best_of(3, jobs, lambda name, result: None)  # interleaved, best of three; nothing to check
    cpu, plain = ({p: best[f"{impl}_p{p}"] for p in (1, 2)} for impl in ("mpstream", "plain"))
    scaling, machine_scaling = cpu[1] / cpu[2], plain[1] / plain[2]
    string_ns = string_key_costs(n // 5)
    print(f"machine: {machine_line()}")
    print(f"{n:,} events, {KEYS:,} keys, batches of {BATCH:,}, salt {SALT}")
    print("M events/s (- where an impl did not run)")
    print(f"{'impl':18s}" + "".join(f"{d:>13s}" for d in DISTS) + f"{'hot / numpy':>13s}")
    for impl in dict.fromkeys(i for d in DISTS for i in results[d]):
        rates = [results[d].get(impl, {}).get("events_per_s") for d in DISTS]
        cells = "".join(f"{r / 1e6:13.2f}" if r else f"{'-':>13s}" for r in rates)
        hot = results["hot"].get(impl, {}).get("events_per_s")
        print(f"{impl:18s}{cells}" + (f"{hot / results['hot']['numpy']['events_per_s']:13.2f}" if hot else ""))
    for dist in partitions:
        for impl, counts in partitions[dist].items():
            print(f"rows into each keyed-stage instance, {dist:7s} {impl:16s}: {counts}")
    ratio = {d: results[d]["mpstream_salted"]["events_per_s"] / results[d]["numpy"]["events_per_s"] for d in results}
    print(f"salted/numpy: hot {ratio['hot']:.2f}, uniform {ratio['uniform']:.2f} (hot/uniform {ratio['hot'] / ratio['uniform']:.2f})")
    for dist in ("str_uniform", "str_hot"):
        if "duckdb" in results[dist]:
            best = max(results[dist][i]["events_per_s"] for i in ("mpstream_hash", "mpstream_salted"))
            print(f"string keys, {dist}: best mpstream / duckdb {best / results[dist]['duckdb']['events_per_s']:.2f}")
    print(f"string keys, one process, ns per row: hash {string_ns['hash']:.2f}, "
          f"key lookup (hash, key map, new keys' strings) {string_ns['key_index']:.2f}")
    print(f"keyed edge alone (source -> key_by -> a sink that drops them, parallelism 2), uniform: "
          f"{n / shuffle_s / 1e6:.2f} M events/s")
    print(f"CPU-heavy map ({rows:,} URLs): parallelism 1 {cpu[1]:.2f} s, 2 {cpu[2]:.2f} s: {scaling:.2f}x; "
          f"the same parsing in 1 and 2 plain forked processes {plain[1]:.2f} s, {plain[2]:.2f} s: {machine_scaling:.2f}x")
    print(json.dumps({"bench": "keyed_agg", "machine": machine_line(), "events": n, "results": results,
                      "partitions": partitions, "string_key_ns": string_ns,
                      "shuffle": {"events_per_s": round(n / shuffle_s), "seconds": round(shuffle_s, 4)}, "cpu_map": {"seconds_p1": round(cpu[1], 3),
                                                            "seconds_p2": round(cpu[2], 3), "speedup": round(scaling, 3),
                                                            "plain_seconds_p1": round(plain[1], 3),
                                                            "plain_seconds_p2": round(plain[2], 3),
                                                            "plain_processes_speedup": round(machine_scaling, 3)}}))


if __name__ == "__main__":
    main()
