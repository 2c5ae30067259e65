"""The `hardneg prep` subcommand: argument parsing and the handler (the offline side owns it)."""
from __future__ import annotations

import argparse

from pipeline.errors import HardnegError


def add_prep_parser(sub) -> None:
    """Register `prep SOURCE OUT` and `prep verify OUT` on the CLI's subparsers."""
    p = sub.add_parser("prep", help="shard a dataset (or `prep verify OUT`)",
                       description="Write WebDataset shards + manifest.json for SOURCE into OUT (any fsspec URL).")
    p.add_argument("source", metavar="SOURCE", help="builtin:digits | imagefolder:PATH | verify")
    p.add_argument("out", metavar="OUT", help="output directory or URL")
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--test-size", type=int, default=300, help="held-out test images for builtin:digits")
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
        print(f"ok: every shard of {args.out} matches its manifest")
        return
    from data_prep.prep import prepare

    manifest = prepare(args.source, args.out, shard_size=args.shard_size, seed=args.seed,
                       test_size=args.test_size, progress=not args.quiet)
    counts = ", ".join(f"{s}: {v['num_samples']} in {len(v['shards'])} shards" for s, v in manifest["splits"].items())
    print(f"wrote {args.out} ({counts})")
