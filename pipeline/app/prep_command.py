"""The `hardneg prep` subcommand: argument parsing and the handler (the offline side owns it)."""

from __future__ import annotations

import argparse

from pipeline.errors import HardnegError

SOURCES_HELP = (
    "builtin:digits | cifar10:PATH | cifar100:PATH | stl10:PATH | tinyimagenet:PATH | imagefolder:PATH "
    "(PATH: an official archive or its folder, any fsspec URL) | parquet:PATH[?image=COL&label=COL] "
    "(Hugging Face parquet exports) | wds:URL_PATTERN[?image=EXT;EXT&label=EXT] (existing WebDataset "
    "shards, e.g. /data/train-{000000..000009}.tar) | verify"
)


def add_prep_parser(sub) -> None:
    """Register `prep SOURCE OUT` and `prep verify OUT` on the CLI's subparsers."""
    p = sub.add_parser(
        "prep",
        help="shard a dataset (or `prep verify OUT`)",
        description="Write WebDataset shards and/or FFCV files + manifest.json for SOURCE into OUT (any fsspec "
        "URL: a path, s3://, gs://, memory://). Rerunning resumes: finished files are kept. "
        "S3-compatible stores: set AWS_ENDPOINT_URL (and the usual AWS_* credentials).",
    )
    p.add_argument("source", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("out", metavar="OUT", help="output directory or URL")
    p.add_argument(
        "--format",
        choices=("wds", "ffcv", "both"),
        default="wds",
        help="WebDataset shards, one FFCV .beton per split, or both (default wds)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=None, help="samples per shard (default 512)")
    size.add_argument(
        "--shard-bytes", metavar="SIZE", default=None, help="about this many bytes per shard instead, e.g. 64MB or 1GiB"
    )
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="write shards as Ray tasks on this cluster (e.g. auto or ray://HOST:10001); OUT must be "
        "reachable from every node",
    )
    p.add_argument(
        "--image-format",
        choices=("auto", "png", "jpg"),
        default="auto",
        help="auto: PNG (lossless) up to 128x128 px, JPEG above (default auto)",
    )
    p.add_argument("--strict", action="store_true", help="fail on an undecodable image instead of skipping it")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--test-size", type=int, default=300, help="held-out test images for builtin:digits")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        metavar="F",
        help="hold out this share of train, per class (fixed seed), as the 'holdout' split that the kNN "
        "monitor and checkpoints/best use (default 0.1 for builtin:digits, else 0)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        metavar="F",
        help="for a source without a test split (an imagefolder): hold out this share of train, per class "
        "(fixed seed), as the 'test' split that `hardneg eval` reads (default: none)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prep)


def cmd_prep(args: argparse.Namespace) -> None:
    if args.source == "verify":
        from data_prep.manifest import verify

        problems = verify(args.out)
        for problem in problems:
            print(problem)
        if problems:
            raise HardnegError(f"{len(problems)} problem(s) in {args.out}")
        print(f"ok: every file of {args.out} matches its manifest")
        return
    from data_prep.prep import prepare

    mapper = None
    if args.ray:
        from cluster.prep import ray_mapper

        mapper = ray_mapper(args.ray)
    status: dict = {}
    try:
        manifest = prepare(
            args.source,
            args.out,
            shard_size=512 if args.shard_size is None else args.shard_size,  # 0 is refused, not the default
            seed=args.seed,
            test_size=args.test_size,
            progress=not args.quiet,
            format=args.format,
            workers=args.workers,
            strict=args.strict,
            shard_bytes=args.shard_bytes,
            image_format=args.image_format,
            mapper=mapper,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            status=status,
        )
    except KeyboardInterrupt:
        raise HardnegError("interrupted; rerun the same command to resume (finished files are kept)") from None
    parts = []
    for split, info in manifest["splits"].items():
        files = [f"{len(info['shards'])} shards"] if info["shards"] else []
        files += ["1 FFCV file"] if info.get("ffcv") else []
        parts.append(f"{split}: {info['num_samples']} in {' + '.join(files)}")
    skipped = f"; {len(manifest['skipped'])} inputs skipped (listed in the manifest)" if manifest["skipped"] else ""
    done = "wrote" if status.get("wrote", True) else "nothing to do: every file is in place in"
    print(f"{done} {args.out} ({', '.join(parts)}){skipped}")
