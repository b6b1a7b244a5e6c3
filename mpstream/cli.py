"""The ``mpstream`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import PlanError


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int of at least minimum (argparse names the option on error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _port(text: str) -> int:
    value = _integer(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0 to 65535, got {value}")
    return value


def _seconds(zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of seconds > 0 (>= 0 with zero)."""
    bound = ">= 0" if zero else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds {bound}, got {text!r}") from None
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be a number of seconds {bound}, got {value}")
        return value
    parse.__name__ = f"seconds {bound}"
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpstream", description="mpstream: columnar pipelines, one process per operator")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the click-stream demo job and verify its result")
    demo.add_argument("--events", type=_integer(0), default=10_000_000, help="events to generate (default 10M)")
    demo.add_argument("--parallelism", type=_integer(1), default=2, help="instances per operator (default 2)")
    demo.add_argument("--salt", type=_integer(0), default=4, help="> 1: pre-aggregate in each source (two stages); 0 or 1: one stage (default 4)")
    demo.add_argument("--batch-size", type=_integer(1), default=65536, help="rows per batch (default 65536)")
    demo.add_argument("--out", default=None, help="directory for the CSV output (default: a temporary one, removed at the end)")
    demo.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
    demo.add_argument("--checkpoint-interval", type=_seconds(), default=None,
                      help="take aligned checkpoints every S seconds (default: none; 0.2 with --kill-workers)")
    demo.add_argument("--unaligned-checkpoints", action="store_true",
                      help="checkpoint barriers overtake the records waiting in the rings (kept in the checkpoint)")
    demo.add_argument("--aligned-checkpoint-timeout", type=_seconds(zero=True), default=None,
                      help="with --unaligned-checkpoints: each checkpoint starts aligned and turns unaligned after S "
                           "seconds (0: at once)")
    demo.add_argument("--kill-workers", type=_integer(0), default=0,
                      help="SIGKILL K random workers at random moments; the job recovers and still verifies")
    demo.add_argument("--checkpoint-dir", default=None,
                      help="where checkpoints go (default: OUT/checkpoints when checkpointing)")
    demo.add_argument("--resume", action="store_true",
                      help="continue from the newest valid checkpoint in --checkpoint-dir (after a crash or a stop)")
    demo.add_argument("--unbounded", action="store_true",
                      help="sources never end: run until SIGTERM (stop with a final checkpoint, verify, exit 0) "
                           "or Ctrl-C; the aggregate emits the domains that changed every second")
    demo.add_argument("--rate", type=_integer(1), default=None,
                      help="at most N events/s per source instance (default: as fast as it goes)")
    demo.add_argument("--event-time", action="store_true",
                      help="timestamps out of order (plus late stragglers): per-domain 1-minute tumbling windows "
                           "with allowed lateness and a late side output, verified against the same rules in numpy")
    demo.add_argument("--metrics-port", type=_port, default=None,
                      help="serve the job's counters to Prometheus at http://127.0.0.1:P/metrics (the metrics extra)")
    top = commands.add_parser("top", help="watch the mpstream jobs running on this machine")
    top.add_argument("--once", action="store_true", help="print one view and exit")
    top.add_argument("--json", action="store_true", help="print one view as JSON (a list of jobs) and exit")
    top.add_argument("--instances", action="store_true", help="show every operator instance")
    top.add_argument("--interval", type=_seconds(), default=1.0, help="seconds between refreshes (default 1)")
    plot = commands.add_parser("plot", help="draw a run's throughput and busy/idle/backpressured time (the plot extra)")
    plot.add_argument("input", help="`mpstream demo --json` output, or a file from JobResult.save_timeline()")
    plot.add_argument("-o", "--output", default="run.png", help="the image to write (default run.png)")
    plot.add_argument("--title", default="mpstream run", help="the chart's title")
    args = parser.parse_args(argv)
    if args.command == "top":
        from .top import main as top_main

        return top_main(args.once, args.json, args.instances, args.interval)
    if args.command == "plot":
        from .plot import load_timeline, plot as draw

        try:
            draw(load_timeline(args.input), args.output, args.title)
        except (OSError, ValueError, PlanError) as exc:
            print(f"mpstream plot: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.output}")
        return 0
    if args.event_time and args.unbounded:
        parser.error("--event-time runs a bounded job: leave out --unbounded")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    if args.aligned_checkpoint_timeout is not None and not args.unaligned_checkpoints:
        parser.error("--aligned-checkpoint-timeout needs --unaligned-checkpoints")
    if args.resume and args.unbounded and not args.out:
        parser.error("--resume --unbounded needs --out: the output directory of the run it continues")
    options = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        from .demo import DemoOptions, run_demo

        summary = run_demo(DemoOptions(**options))
    except PlanError as exc:  # e.g. --metrics-port without prometheus-client, or a port in use
        print(f"mpstream demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpstream: interrupted; every worker was stopped", file=sys.stderr)
        return 130
    return 0 if summary["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
