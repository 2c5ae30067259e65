"""CLI subcommands for the trained encoder: `export`, `embed`, and `upgrade-checkpoint` for old files.

The training stack is imported inside the handlers, so `hardneg --help` stays fast.
"""

from __future__ import annotations

import argparse
import json


def add_encoder_parsers(sub) -> None:
    """Register export/embed/upgrade-checkpoint on the CLI's subparsers."""
    p = sub.add_parser(
        "export",
        help="write a checkpoint's encoder as safetensors + JSON (no hardneg needed to load it)",
        description="Write OUT/encoder.safetensors (the backbone's state dict) and OUT/encoder.json (how to build "
        "it with torchvision, and the input it expects).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir, its state.pt, or a run dir")
    p.add_argument("out", metavar="OUT", help="folder to write (replaced whole if it exists)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "embed",
        help="features and labels of a prepared split, from a checkpoint's encoder",
        description="Run the frozen backbone over one split of prepared data (eval transform) and write the "
        "features and labels: OUT.parquet (columns label, feature) or a folder OUT of features.npy + labels.npy.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir, its state.pt, or a run dir")
    p.add_argument("data", metavar="DATA", help="prepared data (folder with manifest.json)")
    p.add_argument("out", metavar="OUT", help="a path ending in .parquet, or a folder for .npy files")
    p.add_argument("--split", default=None, help="which split (default: the checkpoint's data.eval_split)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's eval.batch_size")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "upgrade-checkpoint",
        help="rewrite an old checkpoint in today's safe format",
        description="Rewrite CHECKPOINT's state.pt with its config as YAML text and only plain data. A file the "
        "safe reader refuses is read with pickle only with --unsafe-load, which runs any code it holds.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir or its state.pt (local)")
    p.add_argument(
        "--unsafe-load",
        action="store_true",
        help="read a file the safe reader refuses with pickle: ONLY for a checkpoint you wrote yourself",
    )
    p.set_defaults(func=cmd_upgrade_checkpoint)


def cmd_export(args: argparse.Namespace) -> None:
    from pipeline.encoder_io import export_encoder

    spec = export_encoder(args.checkpoint, args.out)
    print(
        f"wrote {args.out}: {spec['weights']} ({spec['architecture']}, {spec['feature_dim']}-d features, "
        f"step {spec['trained']['step']}) and encoder.json"
    )


def cmd_embed(args: argparse.Namespace) -> None:
    from pipeline.errors import HardnegError

    if args.batch_size is not None and args.batch_size < 1:
        raise HardnegError(f"--batch-size={args.batch_size}; expected a positive number")
    from pipeline.encoder_io import embed_split

    print(json.dumps(embed_split(args.checkpoint, args.data, args.out, args.split, args.batch_size), indent=2))


def cmd_upgrade_checkpoint(args: argparse.Namespace) -> None:
    from pipeline.checkpoint import upgrade

    print(upgrade(args.checkpoint, unsafe_load=args.unsafe_load))
