"""The ``hardneg`` console script. Each handler loads its inputs and calls one function.

User errors (HardnegError) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from pipeline import console
from pipeline.app.bench import BENCHES, run_bench
from pipeline.app.encoder_commands import add_encoder_parsers
from pipeline.app.job_commands import add_cluster_parsers
from pipeline.app.prep_command import add_prep_parser
from pipeline.errors import HardnegError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML recipe holding only what differs from the defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=5")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    _verbose_arg(p)


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose", action="store_true", help="show Ray's, MLflow's and the libraries' own logs and warnings"
    )


def _load_config(args):
    from pipeline import config

    cfg = config.load(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def _print_train_summary(result: dict) -> None:
    from pipeline.tracking_store import ui_command

    knn = result.get("knn_top1")
    # the monitor's split (data.val_split): never the test split, which only `hardneg eval` reads
    tail = f", kNN top-1 {knn:.4f} on split {result.get('knn_split')}" if knn is not None else ""
    print(f"run {result['run_name']}: {result['step']} steps{tail}")
    print(f"checkpoint: {result.get('checkpoint')}")
    if result.get("mlflow_run_id"):
        print(f"MLflow run id: {result['mlflow_run_id']}")
        print(f"open the UI:  {ui_command(result['tracking_uri'])}")


def cmd_train(args) -> None:
    cfg = _load_config(args)  # first: a bad flag fails in one line before the training stack is imported
    from pipeline.app.train_command import train_run

    _print_train_summary(train_run(cfg, resume=args.resume))


def cmd_eval(args) -> None:
    from pipeline.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, args.data, args.overrides, protocol=args.protocol, track=args.track, progress=True
    )
    print(json.dumps(result, indent=2))
    if result.get("warning"):  # a probe below chance says so
        console.warn(result["warning"])


def cmd_demo(args) -> None:
    from pipeline import config

    config.load(args.config, args.overrides)  # a bad config fails in one line before the stack is imported
    from pipeline.app.demo import run_demo

    run_demo(args.config, args.out, args.overrides)


def cmd_runs(args) -> None:
    from pipeline.tracking_runs import runs_table
    from pipeline.tracking_spool import sync_spool

    if args.experiment == "sync":  # hardneg runs sync RUN_DIR: upload what a run could not send
        if not args.run_dir:
            raise HardnegError("hardneg runs sync RUN_DIR: give the run directory named by the run's warning")
        done = sync_spool(args.run_dir, args.tracking_uri if args.tracking_uri_given else None)
        print(f"sent {done['records']} records ({done['metric_steps']} metric steps) to {done['uri']}")
        return
    rows = runs_table(args.tracking_uri, args.experiment)
    if args.grid:
        from pipeline.app.runs_view import grid_children

        rows = grid_children(rows, args.tracking_uri, args.experiment)
    if not rows:
        print(f"experiment '{args.experiment}' has no runs")
        return
    from pipeline.app.runs_view import COLUMNS, NARROW, render, sort_rows

    columns = COLUMNS if args.wide or args.format != "text" else NARROW
    print(render(sort_rows(rows, args.sort), args.format, columns), end="")


def cmd_reproduce(args) -> None:
    from pipeline.app.grid_file import check_grid_file

    check_grid_file(args.grid)  # is it a grid? before importing the training stack (seconds)
    from pipeline.app.reproduce import reproduce

    text = reproduce(
        args.grid,
        only=args.max_cells,
        methods=args.method,
        address=args.address,
        max_concurrent=args.max_concurrent,
        overrides=args.overrides,
        out=args.out,
    )
    print(text, end="")


def cmd_bench(args) -> None:
    code = run_bench(args.name, args.args)
    if code:
        raise SystemExit(code)


def _version() -> str:
    """The installed package's version (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hardneg")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Long on purpose: a flat list of the subcommands' argparse declarations, one block per command."""
    parser = argparse.ArgumentParser(prog="hardneg", description="Contrastive pretraining with hard negatives.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_prep_parser(sub)

    p = sub.add_parser("train", help="pretrain an encoder", description="Pretrain per a config (Ray Train or local).")
    _config_args(p)
    p.add_argument(
        "--resume",
        action="store_const",
        const="",
        default=None,
        help="continue a stopped run from its last checkpoint: tracking.run_name, else the latest run",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="kNN / linear-probe top-1 of a checkpoint, as JSON",
        description="Weighted kNN on frozen backbone features (memory = train split, queries = "
        "test split) and/or the papers' linear probe.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint dir, its state.pt, or a run dir")
    p.add_argument("--data", required=True, metavar="OUT", help="prepared shards (directory with manifest.json)")
    p.add_argument(
        "--protocol",
        choices=("knn", "linear", "all"),
        default="knn",
        help="weighted kNN (default), the linear probe, or both",
    )
    p.add_argument(
        "--track",
        action="store_true",
        help="also log the results into the checkpoint's MLflow run (a new run if it had none)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.knn_k=20 eval.probe_epochs=50")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        help="prep + train + eval on builtin:digits, with baselines",
        description="The whole job on the embedded digits dataset; ends printing kNN top-1.",
    )
    p.add_argument("--config", default="configs/demo.yaml", metavar="FILE", help="default configs/demo.yaml")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="where shards, runs and mlflow.db go")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _verbose_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "runs",
        help="table of an experiment's runs",
        description="Run, run id, method, dataset, "
        "start (UTC), training time, temperature and the method's own settings, best and last kNN top-1, "
        "linear-probe top-1 and mean training images/s of every run of EXPERIMENT.",
    )
    p.add_argument(
        "experiment",
        metavar="EXPERIMENT",
        nargs="?",
        default="hardneg",
        help="an experiment name, or `sync RUN_DIR`: upload what a run kept while its server was down",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--tracking-uri", default=None, help="default sqlite:///mlflow.db (sync: the run's own server)")
    p.add_argument(
        "--sort",
        metavar="COLUMN",
        help="sort by this column header, e.g. 'best kNN' (numbers: highest first); default: newest first",
    )
    p.add_argument(
        "--format",
        choices=("text", "csv", "md"),
        default="text",
        help="aligned text (default), CSV (raw numbers) or a markdown table",
    )
    p.add_argument("--wide", action="store_true", help="text: every column (default: what fits 120 columns)")
    p.add_argument(
        "--grid",
        action="store_true",
        help="only the cells of the experiment's reproduce grid (the child runs of its parent run)",
    )
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "reproduce",
        help="run a method x dataset x seed grid and tabulate it",
        description="Pretrain + evaluate every unfinished cell of GRID.yaml (finished cells are "
        "skipped, interrupted ones resumed) and write a markdown table beside the "
        "published numbers.",
    )
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--max-cells", type=int, default=None, help="run at most this many unfinished cells")
    p.add_argument(
        "--method",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this method's cells (repeatable; the table still shows every finished cell)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="the Ray cluster to run the cells on (HOST:6379, 'auto' inside a Ray Job); default: a private local Ray",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        metavar="N",
        help="at most N cells at once (default: as many as the cluster's CPUs/GPUs hold)",
    )
    p.add_argument("--out", metavar="DIR", help="the grid's folder for records and table, in place of its out:")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="applied to every cell last, e.g. cluster.storage_path=s3://B/runs tracking.uri=http://HEAD:5000",
    )
    _verbose_arg(p)
    p.set_defaults(func=cmd_reproduce)

    add_encoder_parsers(sub)
    add_cluster_parsers(sub)

    p = sub.add_parser(
        "bench",
        help="benchmarks printing ratios measured in one run",
        description="Run a benchmark; arguments after NAME go to it (NAME --help).",
    )
    p.add_argument("name", choices=sorted(BENCHES), metavar="NAME", help=", ".join(sorted(BENCHES)))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    p.set_defaults(func=cmd_bench)
    return parser


def _interrupt_on_sigterm():
    """Returns the previous handler. SIGTERM (`hardneg stop`, `ray job stop`, a scheduler's preemption) unwinds like Ctrl-C, so the MLflow
    run is marked KILLED and temp files are cleaned up instead of the process vanishing mid-write."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "runs":
        args.tracking_uri_given = args.tracking_uri is not None
        args.tracking_uri = args.tracking_uri or "sqlite:///mlflow.db"
    console.configure(getattr(args, "verbose", False) or console.is_verbose())
    previous = _interrupt_on_sigterm()
    if args.command == "train" and args.resume is not None:
        # `--resume` continues tracking.run_name when one is given
        args.resume = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("tracking.run_name=")), "")
    try:
        args.func(args)
    except HardnegError as e:
        console.error(str(e))
        return 2
    except KeyboardInterrupt:
        hint = {
            "train": "; `hardneg train ... --resume` continues from the last checkpoint",
            "prep": "; rerunning the same command keeps the finished shards",
            "reproduce": "; rerunning the same command skips the finished cells and resumes the others",
        }.get(args.command, "")
        console.tell(f"hardneg: interrupted{hint}")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
