"""Progress bars for ``run(progress=True)``: one per source, rows and rows/s, with a total
where the source knows its size; drawn by tqdm (``pip install 'mpstream[progress]'``) and
only on a terminal. The coordinator updates them from the job's counters board."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from .counters import JobCounters

__all__ = ["ProgressBars"]


class ProgressBars:
    """A bar per source (name -> total rows, None when unknown)."""

    def __init__(self, sources: dict[str, int | None]) -> None:
        self.bars: dict[str, Any] = {}
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            warnings.warn("progress=True draws its bars with tqdm, which is not installed: "
                          "pip install 'mpstream[progress]'; the job runs without them", stacklevel=5)
            return
        try:  # a terminal that reports no width (some ptys): tqdm would draw nothing
            width = {"dynamic_ncols": True} if os.get_terminal_size(sys.stderr.fileno()).columns else {"ncols": 80}
        except (OSError, ValueError):
            width = {"ncols": 80}
        for position, (name, total) in enumerate(sources.items()):
            self.bars[name] = tqdm(total=total, desc=name, unit=" rows", unit_scale=True, position=position,
                                   leave=True, file=sys.stderr, **width)

    def update(self, job: JobCounters) -> None:
        rows: dict[str, int] = {}
        for op in job.operators:
            if op.name in self.bars:
                rows[op.name] = rows.get(op.name, 0) + op.records_in
        for name, bar in self.bars.items():
            done = rows.get(name, 0)
            if done != bar.n:
                bar.update(done - bar.n)  # after a restart it goes back: the rows are read again

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}
