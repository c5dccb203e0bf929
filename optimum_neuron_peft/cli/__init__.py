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
import os
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

DEBUG_ENV = "OPTIMUM_NEURON_PEFT_DEBUG"  # set to 1 (or pass --debug) to see the traceback of an error
EXIT_OK, EXIT_FAULT, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


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
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (anywhere on the command line; or {DEBUG_ENV}=1)")  # fmt: skip
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


_MAX_MESSAGE = 1000


def _one_line(text: str) -> str:
    """An error message as one line (library messages, e.g. torch's, can span several), bounded in length."""
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def _os_error_message(err: OSError) -> str:
    import errno

    cause = err.strerror or str(err)
    code = errno.errorcode.get(err.errno or 0)
    if code:
        cause = f"{cause} ({code})"
    files = [str(f) for f in (err.filename, err.filename2) if f is not None]
    return f"{' -> '.join(files)}: {cause}" if files else cause


def error_exit(err: BaseException) -> tuple[str, int]:
    """The one stderr line and the exit status of an error that ended a command."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(err, OptimumNeuronPeftError):
        return _one_line(err), EXIT_USER_ERROR
    if isinstance(err, OSError):
        return _one_line(_os_error_message(err)), EXIT_FAULT
    if isinstance(err, MemoryError):
        return "out of memory", EXIT_FAULT
    if isinstance(err, RecursionError):
        return "input nested too deeply to read", EXIT_USER_ERROR
    hint = f" (unexpected; run with --debug or {DEBUG_ENV}=1 for the traceback)"
    return _one_line(f"{type(err).__name__}: {err}") + hint, EXIT_FAULT


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error ends as one ``error: ...`` line on stderr and a non-zero exit status (see
    `error_exit`); ``--debug`` anywhere on the command line, or ``OPTIMUM_NEURON_PEFT_DEBUG=1``, shows the
    traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        command = next((a for a in argv if not a.startswith("-")), None)  # the first positional is the command
        parser = build_parser(command if command in COMMANDS else "")  # no command: --help or an error, nothing imported
        args = parser.parse_args(argv)
        return int(args._run(args) or 0)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 - the CLI's contract: one line, no traceback (unless --debug)
        if debug:
            raise
        message, status = error_exit(err)
        print(f"error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
