"""``mpstream plot run.json -o run.png``: a picture of a run from its timeline
(:mod:`mpstream.timeline`): records per second per operator on top (log scale), then per operator the
shares of its processes' time busy, idle and backpressured; checkpoints are marked with grey
lines, restarts with red ones. The input is ``mpstream demo --json`` output or a file written by
``JobResult.save_timeline``. Drawn by matplotlib (``pip install 'mpstream[plot]'``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import PlanError

__all__ = ["load_timeline", "plot"]


def load_timeline(path: str) -> dict[str, Any]:
    """The timeline in a JSON file: the last line that is a JSON object with a "timeline"."""
    with open(path) as f:
        text = f.read()
    for candidate in [text] + text.splitlines()[::-1]:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("timeline"), dict):
            return value["timeline"]
    raise ValueError(f"{path} holds no timeline: give it the output of `mpstream demo --json` or a file "
                     f"written by JobResult.save_timeline()")


def plot(timeline: dict[str, Any], out: str, title: str = "mpstream run") -> None:
    """Draws the timeline into the image file ``out`` (PNG, SVG, PDF: by its suffix)."""
    try:
        import matplotlib
    except ImportError:
        raise PlanError("drawing a timeline needs matplotlib: pip install 'mpstream[plot]'") from None
    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    columns = {name: np.asarray(values) for name, values in timeline["columns"].items()}
    names = list(dict.fromkeys(columns["operator"].tolist()))
    if not names:
        raise ValueError("the timeline has no samples: the run was shorter than two samples (0.5 s)")
    fig, axes = plt.subplots(len(names) + 1, 1, sharex=True, figsize=(10, 2.6 + 1.3 * len(names)),
                             gridspec_kw={"height_ratios": [3] + [1] * len(names)}, squeeze=False)
    axes = axes[:, 0]
    for i, name in enumerate(names):  # chained operators run at one rate: dashes tell them apart
        rows = (columns["operator"] == name) & (columns["records_in_per_s"] > 0)
        axes[0].plot(columns["seconds"][rows], columns["records_in_per_s"][rows], label=name,
                     linestyle=("-", "--", ":", "-.")[i % 4], linewidth=1.4,
                     marker="o" if rows.sum() < 10 else None)  # a short run: a few points, not a line
    axes[0].set_yscale("log")
    axes[0].set_ylabel("records/s in")
    axes[0].set_title(title)
    axes[0].legend(loc="lower left", fontsize="small", ncol=4)
    for ax, name in zip(axes[1:], names):
        rows = columns["operator"] == name
        ax.stackplot(columns["seconds"][rows], columns["busy"][rows], columns["idle"][rows],
                     columns["backpressured"][rows], labels=["busy", "idle", "backpressured"],
                     colors=["#4c72b0", "#dddddd", "#dd8452"])
        ax.set_ylim(0, 1)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize="small")
        ax.set_yticks([])
    axes[1].legend(loc="upper right", fontsize="x-small", ncol=3)
    for ax in axes:
        for at in timeline.get("checkpoints", []):
            ax.axvline(at, color="grey", linewidth=0.6, linestyle="--")
        for at in timeline.get("restarts", []):
            ax.axvline(at, color="red", linewidth=1.2)
    axes[-1].set_xlabel("seconds since the job started (grey: checkpoints, red: restarts)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
