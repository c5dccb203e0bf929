"""Command-line entry point: ``optimum-neuron-peft <command> ...``.

The CLI is thin: each command module parses and validates its arguments and makes one library call. Commands are
listed in a table and only the module of the command being run is imported, so ``--help`` stays fast, a broken
optional dependency of one command does not break the others, and a command that needs no torch (consolidating a
full-model checkpoint) does not pay for importing it (~2 s) because another command's module does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from ..errors import OptimumNeuronPeftError

# command name -> (module implementing ``add_arguments(parser)`` and ``run(args) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("optimum_neuron_peft.cli.demo", "end-to-end LoRA run on a tiny model built locally (no network)"),
    "consolidate": ("optimum_neuron_peft.cli.consolidate", "turn a sharded checkpoint into a Transformers/PEFT directory"),
    "reshard": ("optimum_neuron_peft.cli.reshard", "convert a checkpoint to another tensor-parallel size"),
    "verify": ("optimum_neuron_peft.cli.verify", "check a consolidated directory against its sharded checkpoint"),
    "merge": ("optimum_neuron_peft.cli.merge", "combine adapters (TIES, DARE, SVD...) or merge one into base weights"),
    "train": ("optimum_neuron_peft.cli.train", "LoRA fine-tuning (SFT) on dp x tp local processes, then the adapter"),
}


def _implemented(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; only ``command``'s arguments are added (every command's when None): its module
    alone is imported, the others are listed with their help line."""
    parser = argparse.ArgumentParser(
        prog="optimum-neuron-peft",
        description="Tensor-parallel LoRA fine-tuning tools: training, consolidation, resharding, merging, demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        if not _implemented(module_name):
            continue  # command not implemented in this build
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the first positional is the command
    parser = build_parser(command if command in COMMANDS else "")  # no command: --help or an error, nothing imported
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
