"""``optimum-neuron-peft reshard CHECKPOINT_DIR OUTPUT_DIR --tp-size N``: change the tensor-parallel size."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", type=Path, help="sharded checkpoint (ours or optimum-neuron's) or a Transformers directory (Llama, Mistral, Qwen3, Granite)")
    parser.add_argument("output_dir", type=Path, help="output checkpoint, in our sharded format")
    parser.add_argument("--tp-size", type=int, required=True, help="the new tensor-parallel size")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.reshard import reshard
    from ..utils.atomic import claimed_output

    with claimed_output(args.output_dir, args.overwrite, inputs=[args.checkpoint_dir]):
        result = reshard(
            args.checkpoint_dir, args.output_dir, tp_size=args.tp_size, overwrite=args.overwrite,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    print(result.summary())
    return 0
