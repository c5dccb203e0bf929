"""Command-line entry point: ``optimum-neuron-peft <command> ...``.

The CLI is thin: each command module parses and validates its arguments and makes one library call. Commands are
listed in a table and imported lazily, so ``--help`` stays fast and a broken optional dependency of one command
does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import OptimumNeuronPeftError

# command name -> (module implementing ``add_arguments(parser)`` and ``run(args) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("optimum_neuron_peft.cli.demo", "end-to-end LoRA run on a tiny model built locally (no network)"),
    "consolidate": ("optimum_neuron_peft.cli.consolidate", "turn a sharded checkpoint into a Transformers/PEFT directory"),
    "reshard": ("optimum_neuron_peft.cli.reshard", "convert a checkpoint to another tensor-parallel size"),
    "verify": ("optimum_neuron_peft.cli.verify", "check a consolidated directory against its sharded checkpoint"),
    "merge": ("optimum_neuron_peft.cli.merge", "combine adapters (TIES, DARE, SVD...) or merge one into base weights"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-neuron-peft",
        description="Tensor-parallel LoRA fine-tuning tools: consolidation, resharding, merging, demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # command not implemented in this build
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except OptimumNeuronPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
