"""``optimum-neuron-peft train CONFIG.yaml``: LoRA fine-tuning (SFT) on dp x tp local processes.

The config (YAML; every key optional when given as a flag)::

    model: path/to/transformers_model_dir      # with its tokenizer
    train_file: data/train.jsonl               # .json/.jsonl/.parquet rows: messages, prompt/completion or text
    eval_file: data/eval.jsonl                 # optional
    lora: {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}   # peft.LoraConfig, ORIGINAL module names
    training: {output_dir: runs/x, tensor_parallel_size: 2, max_steps: 100, max_length: 512, packing: true}
                                               # any optimum_neuron_peft.training.SFTConfig field
    resume_from_checkpoint: null               # true (the latest in output_dir) or a checkpoint-N path
    adapter_dir: null                          # where the consolidated adapter goes (default <output_dir>/adapter)

``--nproc N`` starts N local processes with torch.distributed.run (world = dp x tp, dp = N / tensor_parallel_size);
under ``torchrun`` the command runs in every process itself. At the end the vanilla PEFT adapter is written once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

TOP_KEYS = ("model", "train_file", "eval_file", "lora", "training", "resume_from_checkpoint", "adapter_dir")
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config (see `optimum-neuron-peft train -h`)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="local processes to start (dp x tp); ignored under torchrun (default: %(default)s)")
    parser.add_argument("--model", default=None, help="Transformers model directory (overrides config 'model')")
    parser.add_argument("--train-file", default=None, help="training data file (overrides config 'train_file')")
    parser.add_argument("--eval-file", default=None, help="evaluation data file (overrides config 'eval_file')")
    parser.add_argument("--output-dir", default=None, help="overrides training.output_dir")
    parser.add_argument("--tp", type=int, default=None, help="overrides training.tensor_parallel_size")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set a training field (YAML value), e.g. --set max_steps=10; repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--adapter-dir", default=None, help="where the consolidated adapter is written")
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config file merged with the flags, checked; raises ConfigError naming the file / flag."""
    import yaml

    config: dict[str, Any] = {}
    where = "flags"
    if args.config is not None:
        path = Path(args.config)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: expected a mapping of {', '.join(TOP_KEYS)}, found {type(config).__name__}")
        unknown = sorted(set(config) - set(TOP_KEYS))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}; expected some of {list(TOP_KEYS)}")
    for section in ("lora", "training"):
        if not isinstance(config.setdefault(section, {}) or {}, dict):
            raise ConfigError(f"{where}: '{section}' must be a mapping, found {type(config[section]).__name__}")
        config[section] = dict(config[section] or {})
    for key, flag in (("model", "model"), ("train_file", "train_file"), ("eval_file", "eval_file"),
                      ("adapter_dir", "adapter_dir")):  # fmt: skip
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    if args.output_dir is not None:
        config["training"]["output_dir"] = args.output_dir
    if args.tp is not None:
        config["training"]["tensor_parallel_size"] = args.tp
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        config["training"][name] = yaml.safe_load(value)
    if args.resume:
        config["resume_from_checkpoint"] = True
    for key in ("model", "train_file"):
        if not config.get(key):
            raise ConfigError(f"{where}: '{key}' is required (in the config or as --{key.replace('_', '-')})")
    if not (Path(config["model"]) / "config.json").is_file():
        raise ConfigError(f"{where}: model {config['model']!r} is not a Transformers model directory (no config.json)")
    for key in ("train_file", "eval_file"):
        if config.get(key) and not Path(config[key]).is_file():
            raise ConfigError(f"{where}: {key} {config[key]!r}: no such file")
    if not config["training"].get("output_dir"):
        raise ConfigError(f"{where}: training.output_dir is required (or --output-dir)")
    return config


def _forwarded_argv(args: argparse.Namespace) -> list[str]:
    """The command line each launched process runs (everything but --nproc)."""
    argv = ["train"] + ([args.config] if args.config else [])
    for flag in ("model", "train_file", "eval_file", "output_dir", "tp", "adapter_dir"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for item in args.set:
        argv += ["--set", item]
    if args.resume:
        argv.append("--resume")
    return argv


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, argv: list[str]) -> int:
    """torch.distributed.run (torchrun) with ``nproc`` local processes running ``python -m optimum_neuron_peft``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    print(f"starting {nproc} processes", flush=True)
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module",
                                             "optimum_neuron_peft", *argv])  # fmt: skip
    try:
        run(launcher)
    except ChildFailedError as err:
        failures = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in sorted(err.failures.items()))
        raise ConfigError(f"training failed ({failures}); see the processes' output above") from None
    return 0


def train(config: dict[str, Any]) -> Path:
    """Train in this process (one rank of the world); return the consolidated adapter directory."""
    from peft import LoraConfig

    from ..training import SFTConfig, SFTTrainer

    try:
        sft_config = SFTConfig(**config["training"])
    except TypeError as err:
        raise ConfigError(f"training: {err}") from None
    try:
        lora = LoraConfig(**{**DEFAULT_LORA, **config["lora"]}, task_type="CAUSAL_LM")
    except TypeError as err:
        raise ConfigError(f"lora: {err}") from None
    trainer = SFTTrainer(model=config["model"], args=sft_config, train_dataset=config["train_file"],
                         eval_dataset=config.get("eval_file") or None, peft_config=lora)  # fmt: skip
    trainer.train(resume_from_checkpoint=config.get("resume_from_checkpoint") or None)
    out = Path(config.get("adapter_dir") or Path(sft_config.output_dir) / "adapter")
    trainer.save_model(str(out))
    return out


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    config = load_config(args)  # checked once, before any process starts
    if args.nproc > 1 and not _under_launcher():
        return launch(args.nproc, _forwarded_argv(args))
    out = train(config)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(f"wrote the consolidated PEFT adapter to {out}", flush=True)
    if dist.is_initialized():
        from ..parallel import destroy_model_parallel

        destroy_model_parallel()
        dist.destroy_process_group()
    return 0
