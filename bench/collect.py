"""Collect benchmark: a job that returns its rows to the caller. A source of 10M rows (an
int64 and a float64 column, 160 MB) -> ``collect``, at parallelism 1 and 2, timed from the
job's start to ``result["out"]`` in hand (the collect sink's batches travel to the
coordinator out of band, see ``mpstream/messages.py``, and are concatenated once), against
one process copying the same two columns (``np.copy``, the least a caller-owned result costs),
in the same run, the jobs taking turns round by round, best of the rounds. Every result is
checked against the input.

Typed columns (``typed_p1``): the same job at parallelism 1 with the int column as datetime64
and the float one nullable (a masked array, a null in every 7 rows), beside the plain one:
numpy pickles such arrays into the pickle itself, so a batch pickles as plain buffers (see
``Batch.__reduce__``) to travel out of band like the others.

Small batches: the same rows in 512-row (8 KiB) batches, collected (``small_collect``; a
task sends them together, see ``mpstream/output.py``) against the same job whose sink only
drops them (``small_callback``): what returning the rows costs on top of running the job.

    python bench/collect.py [--quick]      # --quick: 2M rows, 3 rounds

The last line is one JSON object.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from transport import best_of, machine_line, quick_option

from mpstream.pipeline import Pipeline


def columns(rows: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(rows), "y": np.arange(rows) / 4}


def typed_columns(rows: int) -> dict[str, np.ndarray]:
    """The same values: x as datetime64[ns], y nullable."""
    return {"x": np.arange(rows).astype("datetime64[ns]"),
            "y": np.ma.MaskedArray(np.arange(rows) / 4, mask=np.arange(rows) % 7 == 0)}


SMALL_BATCH = 512


def collect_job(data: dict[str, np.ndarray], parallelism: int, batch_size: int = 65536, collect: bool = True):
    """A function that runs the job and returns its collected result (None: its sink drops
    the batches)."""
    def run():
        p = Pipeline()
        source = p.from_arrays("src", data, parallelism=parallelism, batch_size=batch_size)
        if not collect:
            source.to_callback("out", lambda batch: None)
            p.run()
            return None
        source.collect("out")
        return p.run()["out"]
    return run


def check(out, data: dict[str, np.ndarray]) -> None:
    order = np.argsort(out["x"])
    assert out["x"].dtype == data["x"].dtype and np.array_equal(out["x"][order], data["x"]), \
        "the collected rows differ from the input"
    for part in (lambda y: np.ma.filled(y, 0), np.ma.getmaskarray):  # a null's value is 0 (mpstream.batch)
        assert np.array_equal(part(out["y"])[order], part(data["y"])), "the collected rows differ from the input"


def bench(rows: int, rounds: int) -> dict[str, float]:
    data, typed = columns(rows), typed_columns(rows)
    jobs = {"mpstream_p1": collect_job(data, 1), "mpstream_p2": collect_job(data, 2),
            "np_copy": lambda: {name: col.copy() for name, col in data.items()},
            "small_collect": collect_job(data, 1, SMALL_BATCH),
            "small_callback": collect_job(data, 1, SMALL_BATCH, collect=False),
            "typed_p1": collect_job(typed, 1)}
    return best_of(rounds, jobs, lambda name, out: out is None or check(out, typed if name.startswith("typed") else data))


def main() -> None:
    quick = quick_option(__doc__, "2M rows, 3 rounds: under 60 s")
    rows = 2_000_000 if quick else 10_000_000
    best = bench(rows, 3 if quick else 7)
    mb = rows * 16 / 1e6
    print(f"machine: {machine_line()}")
    print(f"{rows:,} rows ({mb:.0f} MB) collected, start to result in hand, best of the rounds")
    print(f"{'impl':14s}{'ms':>9s}{'MB/s':>9s}{'vs np_copy':>12s}")
    for name, seconds in best.items():
        print(f"{name:14s}{seconds * 1e3:9.1f}{mb / seconds:9.0f}{seconds / best['np_copy']:11.1f}x")
    print(f"{SMALL_BATCH}-row batches: collected / dropped = {best['small_collect'] / best['small_callback']:.2f}")
    print(f"datetime64 and nullable columns / plain ones, parallelism 1 = {best['typed_p1'] / best['mpstream_p1']:.2f}")
    print(json.dumps({"bench": "collect", "machine": machine_line(), "rows": rows,
                      "seconds": {name: round(s, 5) for name, s in best.items()}}))


if __name__ == "__main__":
    sys.exit(main())
