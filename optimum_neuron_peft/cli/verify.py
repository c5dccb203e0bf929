"""``optimum-neuron-peft verify CHECKPOINT_DIR CONSOLIDATED_DIR``: re-derive the shards and compare bit for bit."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", type=Path, help="the sharded checkpoint that was consolidated")
    parser.add_argument("consolidated_dir", type=Path, help="the output of `consolidate`")
    parser.add_argument("--adapter", metavar="NAME", help="as given to consolidate")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="as given to consolidate")
    parser.add_argument("--skip-checksums", action="store_true", help="do not check the manifest's sha256 of the input")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.verify import verify

    result = verify(
        args.checkpoint_dir, args.consolidated_dir, adapter=args.adapter, dtype=args.dtype,
        check_checksums=not args.skip_checksums,
    )
    print(result.summary())
    return 0
