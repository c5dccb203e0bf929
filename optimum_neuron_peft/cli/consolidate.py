"""``optimum-neuron-peft consolidate CHECKPOINT_DIR [OUTPUT_DIR] ...``: sharded checkpoint -> Transformers/PEFT.

`checkpoint.consolidate` chooses the engine, as for the library: a checkpoint (model and/or adapters) consolidated as saved goes
through the torch-free engine (this command then never imports torch), everything else through the torch engine,
and the printed summary says which and why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", type=Path, help="sharded checkpoint (ours or optimum-neuron's)")
    parser.add_argument(
        "output_dir", type=Path, nargs="?",
        help="output directory (default: CHECKPOINT_DIR with a '-consolidated' suffix, beside it)",
    )  # fmt: skip
    parser.add_argument("--format", choices=["safetensors", "pytorch"], default="safetensors")
    parser.add_argument("--max-shard-size", default="5GB", help="split model weights past this size (default 5GB)")
    parser.add_argument("--adapter", metavar="NAME", help="consolidate only this adapter (into OUTPUT_DIR itself)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating tensors (default: as saved; takes the torch engine)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    parser.add_argument("--verify", action="store_true", help="re-derive every rank's shards from the output and compare bit for bit before publishing it")
    parser.add_argument("--check-checksums", action="store_true", help="check the sha256 of every input file listed in the manifest (our format)")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.add_argument(
        "--engine", choices=["auto", "torch", "torch-free"], default="auto",
        help="auto (default): byte copies without torch when the checkpoint is a full model consolidated as saved, "
        "else torch, saying why; torch-free: fail, saying why, if that engine cannot take it; torch: always torch "
        "(same output bytes)",
    )  # fmt: skip


def default_output_dir(checkpoint_dir: Path) -> Path:
    checkpoint_dir = checkpoint_dir.absolute()
    return checkpoint_dir.with_name(f"{checkpoint_dir.name}-consolidated")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.engine_common import ConsolidateOptions  # imports no torch

    options = ConsolidateOptions(
        format=args.format, max_shard_size=args.max_shard_size, adapter=args.adapter, dtype=args.dtype,
        overwrite=args.overwrite, verify=args.verify, check_checksums=args.check_checksums,
        progress=not args.no_progress and sys.stderr.isatty(),
    )  # fmt: skip
    from ..utils.atomic import claimed_output  # imports no torch

    output_dir = args.output_dir or default_output_dir(args.checkpoint_dir)
    with claimed_output(output_dir, args.overwrite, inputs=[args.checkpoint_dir]):
        from ..checkpoint.consolidate import consolidate_with  # imports torch only for the torch engine

        result = consolidate_with(args.checkpoint_dir, output_dir, options, engine=args.engine)
    print(result.summary() + (" (verified)" if args.verify else ""))
    return 0
