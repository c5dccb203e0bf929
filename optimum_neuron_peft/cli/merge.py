"""``optimum-neuron-peft merge``: combine adapters, or merge one adapter into base weights.

    optimum-neuron-peft merge combine A_DIR B_DIR --weights 0.7 0.3 --combination-type ties --density 0.2 -o OUT
    optimum-neuron-peft merge into-base BASE_DIR ADAPTER_DIR -o OUT [--device cpu|cuda|xla]
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from ..merging import COMBINATION_TYPES, combine_adapters, merge_adapter_into_base
from ..transformations.names import PEFT_WRAPPER_PREFIX
from ..utils.atomic import claimed_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="merge_mode", metavar="MODE")
    sub.required = True

    combine = sub.add_parser("combine", help="combine LoRA adapters into one (PEFT's add_weighted_adapter types)")
    combine.add_argument("adapter_dirs", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter directories")
    combine.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    combine.add_argument("--combination-type", choices=COMBINATION_TYPES, default="svd")
    combine.add_argument("--density", type=float, default=None, help="fraction kept by ties/dare/magnitude_prune")
    combine.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total")
    combine.add_argument("--svd-rank", type=int, default=None, help="rank of svd types (default: max rank)")
    combine.add_argument("--svd-clamp", type=float, default=None, help="quantile clamp of the svd factors")
    combine.add_argument("--seed", type=int, default=None, help="seed of the DARE random masks")

    into_base = sub.add_parser("into-base", help="merge an adapter into base weights (W + scaling * B @ A)")
    into_base.add_argument("base_dir", metavar="BASE_DIR", help="Transformers model directory (safetensors)")
    into_base.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT adapter directory")

    for p in (combine, into_base):
        p.add_argument("-o", "--output-dir", required=True, help="output directory (written atomically)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or xla (Neuron); default cpu")
        p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def _progress_bar(args, unit: str):
    bar = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = tqdm(total=total, unit=unit, desc=args.merge_mode)
        bar.set_postfix_str(name.removeprefix(PEFT_WRAPPER_PREFIX), refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def run(args: argparse.Namespace) -> int:
    inputs = args.adapter_dirs if args.merge_mode == "combine" else [args.base_dir, args.adapter_dir]
    with claimed_output(args.output_dir, args.overwrite, inputs=inputs):
        _run(args)
    print(f"wrote {args.output_dir}")
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.merge_mode == "combine":
        generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
        combine_adapters(
            args.adapter_dirs, args.weights, args.combination_type, density=args.density,
            majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank, svd_clamp=args.svd_clamp,
            output_dir=args.output_dir, overwrite=args.overwrite, device=args.device, generator=generator,
            progress=_progress_bar(args, "module"),
        )
    else:
        merge_adapter_into_base(args.base_dir, args.adapter_dir, args.output_dir, overwrite=args.overwrite,
                                device=args.device, progress=_progress_bar(args, "weight"))
