"""``optimum-neuron-peft demo``: the whole product on a tiny model, locally, in a couple of minutes."""

from __future__ import annotations

import argparse
import sys

from ..errors import OptimumNeuronPeftError

# Beyond these the tensor-parallel and vanilla logits are not the same computation: fail the demo loudly.
LOGITS_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="demo_output", help="where everything is written (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter (default: %(default)s)")
    parser.add_argument("--tp-size", type=int, default=2, help="tensor-parallel processes (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import os

    # The demo prints its own progress; keep the libraries' load bars and deprecation chatter out of it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from ..demo.run import run_demo

    if args.steps < 1:
        raise OptimumNeuronPeftError(f"--steps must be >= 1, got {args.steps}")
    if args.tp_size not in (1, 2, 4):
        raise OptimumNeuronPeftError(f"--tp-size must be 1, 2 or 4 for the tiny model, got {args.tp_size}")
    from ..utils.atomic import claimed_output

    with claimed_output(args.output_dir, args.overwrite):
        report = run_demo(args.output_dir, steps=args.steps, tp_size=args.tp_size, overwrite=args.overwrite,
                          log=lambda m: print(m, flush=True))  # fmt: skip
    print()
    print(report.table())
    if report.max_logits_diff > LOGITS_TOLERANCE or report.merged_logits_diff > LOGITS_TOLERANCE:
        print(f"error: logits differ by more than {LOGITS_TOLERANCE}", file=sys.stderr)
        return 1
    return 0
