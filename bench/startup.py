"""Start-up benchmark: start-to-result of small jobs (10 rows), where starting the processes
is all the work, against ``multiprocessing.Pool(2)`` started and mapped over the same 10 rows
in the same run.

    opsN_pP   a source, N - 2 maps and a collect sink at parallelism P: the maps chain into
              the source's process (``chain=True``, the default), so a job has 2 x P processes
    opsN_pP_unchained   the same with every map in a process of its own (``chain=False``):
              N x P processes, as before operator chaining
    mp_pool   multiprocessing.Pool(2) started, map over the rows, closed
    os_fork   the floor of any engine that runs a task in a process of its own: one
              ``os.fork`` of this process, the child doubling the rows into a pipe, the
              parent reading them and reaping the child
    ops4_p2_rss256, mp_pool_rss256   ops4_p2 and mp_pool again, taking turns, while this
              process holds 256 MB more (Python objects): a fork copies the page tables of
              the process it forks from, so start-up grows with the memory of the process
              that runs the job, for mpstream and the pool alike

Each is timed end to end (``Pipeline()`` built, run, result back), best of the rounds, the
jobs taking turns round by round. Every result is checked (the 10 rows, doubled by each map).

    python bench/startup.py [--quick]      # --quick: 5 rounds instead of 20, under 60 s

The last line is one JSON object.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable

import numpy as np
from transport import best_of, machine_line, quick_option

from mpstream.pipeline import Pipeline

ROWS = 10
JOBS = (("ops1_p1", 1, 1, True), ("ops4_p1", 4, 1, True), ("ops4_p2", 4, 2, True), ("ops8_p2", 8, 2, True),
        ("ops4_p2_unchained", 4, 2, False), ("ops8_p2_unchained", 8, 2, False))


def double(batch):
    return {"x": batch["x"] * 2}


def mpstream_job(operators: int, parallelism: int, chain: bool) -> Callable[[], list[int]]:
    """The rows of a job of ``operators`` operators (1: the source alone, collected)."""
    def run() -> list[int]:
        p = Pipeline()
        stream = p.from_arrays("src", {"x": np.arange(ROWS)}, parallelism=parallelism)
        for i in range(max(0, operators - 2)):
            stream = stream.map(f"map{i}", double, chain=chain)
        stream.collect("out")
        return sorted(p.run()["out"]["x"].tolist())
    return run


def _twice(x: int) -> int:
    return 2 * x


def mp_pool() -> list[int]:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return sorted(pool.map(_twice, range(ROWS)))


def os_fork() -> list[int]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, (np.arange(ROWS, dtype=np.int64) * 2).tobytes())
        os._exit(0)
    os.close(write)
    with open(read, "rb") as pipe:
        rows = np.frombuffer(pipe.read(), np.int64)
    os.waitpid(pid, 0)
    return sorted(rows.tolist())


def bench(rounds: int) -> dict[str, float]:
    jobs: dict[str, Callable[[], list[int]]] = {name: mpstream_job(n, p, chain) for name, n, p, chain in JOBS}
    jobs["mp_pool"] = mp_pool
    jobs["os_fork"] = os_fork
    want = {name: [x * 2 ** max(0, n - 2) for x in range(ROWS)] for name, n, _, _ in JOBS}
    want["mp_pool"] = want["mp_pool_rss256"] = want["os_fork"] = [2 * x for x in range(ROWS)]
    want["ops4_p2_rss256"] = want["ops4_p2"]
    def check(name: str, got: list[int]) -> None:
        assert got == want[name], f"{name}: {got} != {want[name]}"

    best = best_of(rounds, jobs, check)
    ballast = [bytes(1000) for _ in range(256_000)]  # 256 MB in 4 KiB pages, as Python objects are
    best |= best_of(rounds, {"ops4_p2_rss256": jobs["ops4_p2"], "mp_pool_rss256": mp_pool}, check)
    del ballast
    return best


def main() -> None:
    quick = quick_option(__doc__, "5 rounds: under 60 s")
    best = bench(5 if quick else 20)
    print(f"machine: {machine_line()}")
    print(f"start-to-result of {ROWS} rows, best of {5 if quick else 20} rounds")
    print(f"{'job':20s}{'ms':>9s}{'vs mp_pool':>12s}  (_rss256: vs mp_pool_rss256)")
    for name, seconds in best.items():
        pool = best["mp_pool_rss256" if name.endswith("_rss256") else "mp_pool"]
        print(f"{name:20s}{seconds * 1e3:9.1f}{seconds / pool:11.2f}x")
    print(json.dumps({"bench": "startup", "machine": machine_line(),
                      "seconds": {name: round(s, 5) for name, s in best.items()}}))


if __name__ == "__main__":
    sys.exit(main())
