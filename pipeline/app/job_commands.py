"""CLI subcommands that talk to a Ray cluster: `launch`, `status`, `stop`.

Ray itself is imported inside the handlers (cluster/submit.py), so `hardneg --help` stays fast.
"""

from __future__ import annotations

import argparse


def add_cluster_parsers(sub) -> None:
    """Register launch/status/stop on the CLI's subparsers."""
    p = sub.add_parser(
        "launch",
        help="submit training to an existing Ray cluster as a Ray Job",
        description="Submit `hardneg train` as a Ray Job (working dir + pip runtime env), "
        "stream its logs and print the job id.",
    )
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HOST:8265")
    p.add_argument("--config", metavar="FILE")
    p.add_argument(
        "--grid",
        metavar="GRID.yaml",
        help="submit `hardneg reproduce GRID --address auto` instead of training (the overrides go to every cell)",
    )
    p.add_argument("--max-concurrent", type=int, metavar="N", help="with --grid: at most N cells at once")
    p.add_argument("--out", metavar="DIR", help="with --grid: the grid's folder on the head, in place of its out:")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without streaming logs")
    p.add_argument(
        "--no-pip",
        action="store_true",
        help="no pip runtime env: the cluster's Python already has the project's dependencies",
    )
    p.add_argument("--resume", action="store_true", help="continue tracking.run_name (else the latest run)")
    p.add_argument(
        "--verbose", action="store_true", help="the job shows Ray's, MLflow's and the libraries' own logs and warnings"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_launch)
    for name, text in (("status", "print a submitted job's status"), ("stop", "stop a submitted job")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("job_id", metavar="JOB_ID")
        p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HOST:8265")
        p.set_defaults(func=cmd_status if name == "status" else cmd_stop)


def _grid_spec(args: argparse.Namespace) -> dict:
    """The job of `hardneg launch --grid`: the grid checked here (its file, every cell's config and paths)."""
    from cluster.submit import grid_job_spec
    from pipeline.app.grid_file import check_grid_file
    from pipeline.app.reproduce import cell_configs, load_grid
    from pipeline.errors import HardnegError

    if args.config or args.resume:
        raise HardnegError("--grid runs the grid's own configs: drop --config / --resume (a rerun resumes by itself)")
    check_grid_file(args.grid)
    grid = load_grid(args.grid)
    out = args.out or grid.out
    cells = cell_configs(grid, f"{out}/{grid.name}", [*args.overrides, "cluster.address=auto"])
    return grid_job_spec(
        args.grid,
        cells,
        args.overrides,
        out=out,
        pip=not args.no_pip,
        verbose=args.verbose,
        max_concurrent=args.max_concurrent,
    )


def cmd_launch(args: argparse.Namespace) -> None:
    from cluster.submit import launch_job

    try:
        launch_job(
            args.address,
            args.config,
            args.overrides,
            wait=not args.no_wait,
            pip=not args.no_pip,
            resume=args.resume,
            verbose=args.verbose,
            spec=_grid_spec(args) if args.grid else None,
        )
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def cmd_status(args: argparse.Namespace) -> None:
    from cluster.submit import job_status

    print(job_status(args.address, args.job_id))


def cmd_stop(args: argparse.Namespace) -> None:
    from cluster.submit import stop_job

    print(stop_job(args.address, args.job_id))
