"""`SFTConfig` / `SFTTrainer`: TRL's supervised fine-tuning on our tensor-parallel models (docs/training_sft.md).

    from optimum_neuron_peft.training import SFTConfig, SFTTrainer

The SFT fields mean what they mean in TRL's ``SFTConfig`` (same names and defaults, checked by
tests/training/test_sft.py), with these differences, all because Neuron compiles one graph per input shape:

- every batch has exactly the shape (per-device batch size, ``max_length``) (`sft_data.FixedShapeCollator`), so
  ``max_length`` may not be None, ``padding_free`` must stay off and ``pad_to_multiple_of`` does not exist;
- ``packing_strategy`` defaults to ``"wrapped"`` (TRL: ``"bfd"``, which needs padding-free attention); with
  ``"bfd"`` the rows are TRL's bins, padded, and the documents of a row see each other (no per-document masks);
- ``bf16`` and ``gradient_checkpointing`` keep transformers' defaults (off): training is fp32 unless asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from ..errors import ConfigError
from .arguments import TrainingArguments
from .sft_data import PACKING_STRATEGIES, FixedShapeCollator, prepare_sft_dataset
from .trainer import Trainer

# TRL SFTConfig fields that this config does not offer, and why (checked against trl.SFTConfig by the tests).
UNSUPPORTED_TRL_FIELDS = {
    "padding_free": "every batch must keep the shape (batch, max_length)",
    "pad_to_multiple_of": "batches are always padded to exactly max_length",
    "model_init_kwargs": "the model is built by optimum_neuron_peft.models (fp32, the layout fields)",
    "trust_remote_code": "only the Llama-family architectures of optimum_neuron_peft.models are built",
    "router_aux_loss_coef": "no Mixture-of-Experts model is supported",
    "activation_offloading": "CUDA streams",
    "loss_type": "the model's loss is the token-averaged negative log-likelihood ('nll')",
    "pad_token": "deprecated in TRL; set tokenizer.pad_token",
}


@dataclass
class SFTConfig(TrainingArguments):
    """`TrainingArguments` plus TRL's SFT fields; see the module doc for what differs from ``trl.SFTConfig``."""

    # TRL overrides these transformers defaults; so do we (same values)
    learning_rate: float = field(default=2e-5, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps (TRL's default: 10)."})

    chat_template_path: str | None = field(
        default=None, metadata={"help": "A Jinja chat template file (or a tokenizer directory) to use instead of "
                                        "the tokenizer's."}  # fmt: skip
    )
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of text datasets."})
    dataset_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Only key: skip_prepare_dataset (the datasets are already tokenized rows)."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    eos_token: str | None = field(
        default=None, metadata={"help": "End-of-text token appended to text / completions; default the tokenizer's."}
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Sequence length of every batch: rows are truncated, packed and padded to it."}
    )
    truncation_mode: str = field(default="keep_start", metadata={"help": "Only 'keep_start' (TRL's only mode)."})
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the prepared dataset (seed: seed)."})
    packing: bool = field(default=False, metadata={"help": "Pack the rows into rows of exactly max_length tokens."})
    packing_strategy: str = field(
        default="wrapped", metadata={"help": "'wrapped' (concatenate and cut), 'bfd' or 'bfd_split' (TRL's bins)."}
    )
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval dataset; default: packing."})
    completion_only_loss: bool | None = field(
        default=None, metadata={"help": "Loss on completions only; default on for prompt/completion datasets."}
    )
    assistant_only_loss: bool = field(
        default=False, metadata={"help": "Loss on assistant turns only (needs {% generation %} in the template)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.max_length, int) and not isinstance(self.max_length, bool) and self.max_length > 0):
            raise ConfigError(f"SFTConfig.max_length: expected a positive int (every batch is padded to it: Neuron "
                              f"compiles one graph per shape), found {self.max_length!r}")  # fmt: skip
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ConfigError(f"SFTConfig.packing_strategy: expected one of {PACKING_STRATEGIES} (padding-free "
                              f"packing is not offered), found {self.packing_strategy!r}")  # fmt: skip
        if self.truncation_mode != "keep_start":
            raise ConfigError(f"SFTConfig.truncation_mode: expected 'keep_start', found {self.truncation_mode!r}")
        unknown = set(self.dataset_kwargs or {}) - {"skip_prepare_dataset"}
        if unknown:
            raise ConfigError(f"SFTConfig.dataset_kwargs: the only key is 'skip_prepare_dataset', found {sorted(unknown)}")


class SFTTrainer(Trainer):
    """TRL's ``SFTTrainer`` on `Trainer`: prepares ``train_dataset`` / ``eval_dataset`` (``datasets.Dataset`` or a
    local .json / .jsonl / .parquet path) as TRL does (`sft_data.prepare_sft_dataset`) and batches them with
    `sft_data.FixedShapeCollator` unless ``data_collator`` is given. ``processing_class`` is the tokenizer (default:
    the one in the model directory when ``model`` is a path)."""

    def __init__(
        self,
        model: Any = None,
        args: SFTConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        **kwargs: Any,
    ) -> None:
        args = as_sft_config(args)
        if processing_class is None and isinstance(model, (str, os.PathLike)):
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model)
        if processing_class is None:
            raise ConfigError("SFTTrainer: processing_class (the tokenizer) is required when model is not a "
                              "directory holding one")  # fmt: skip
        tokenizer = processing_class
        if args.chat_template_path is not None:
            _load_chat_template(tokenizer, args.chat_template_path)
        if args.eos_token is not None and args.eos_token not in tokenizer.get_vocab():
            raise ConfigError(f"SFTConfig.eos_token={args.eos_token!r} is not in the tokenizer's vocabulary")
        pad_token = tokenizer.pad_token or tokenizer.eos_token
        if pad_token is None:
            raise ConfigError("SFTTrainer: the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token")
        pad_id = tokenizer.convert_tokens_to_ids(pad_token)

        skip = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
        if not skip:
            _ensure_distributed_from_env(args)
            eval_packing = args.packing if args.eval_packing is None else args.eval_packing
            with _main_process_first():
                if train_dataset is not None:
                    train_dataset = self._prepare(train_dataset, tokenizer, args, args.packing, formatting_func,
                                                  "train_dataset")  # fmt: skip
                if isinstance(eval_dataset, dict):
                    eval_dataset = {k: self._prepare(v, tokenizer, args, eval_packing, formatting_func,
                                                     f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}  # fmt: skip
                elif eval_dataset is not None:
                    eval_dataset = self._prepare(eval_dataset, tokenizer, args, eval_packing, formatting_func,
                                                 "eval_dataset")  # fmt: skip
        self._eval_collator = None
        if data_collator is None:
            data_collator = FixedShapeCollator(pad_id, args.max_length, batch_size=args.per_device_train_batch_size)
            self._eval_collator = FixedShapeCollator(pad_id, args.max_length, batch_size=args.per_device_eval_batch_size)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator, processing_class=processing_class, peft_config=peft_config,
                         callbacks=callbacks, **kwargs)  # fmt: skip

    @staticmethod
    def _prepare(dataset, tokenizer, args: SFTConfig, packing: bool, formatting_func, name: str):
        return prepare_sft_dataset(
            dataset, tokenizer, max_length=args.max_length, packing=packing, packing_strategy=args.packing_strategy,
            completion_only_loss=args.completion_only_loss, assistant_only_loss=args.assistant_only_loss,
            dataset_text_field=args.dataset_text_field, formatting_func=formatting_func, eos_token=args.eos_token,
            shuffle_dataset=args.shuffle_dataset, seed=args.seed, num_proc=args.dataset_num_proc, name=name,
        )  # fmt: skip

    def get_eval_dataloader(self, eval_dataset=None):
        # The train collator completes batches to the train batch size; evaluation has its own batch size.
        if self._eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


def as_sft_config(args: TrainingArguments | None) -> SFTConfig:
    """``args`` itself if an `SFTConfig`; a `TrainingArguments` becomes one with the same values and the SFT fields
    at their defaults (as TRL's SFTTrainer does with a plain transformers.TrainingArguments)."""
    if args is None:
        return SFTConfig(output_dir="trainer_output")
    if isinstance(args, SFTConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"SFTTrainer: args must be optimum_neuron_peft.training.SFTConfig (or its TrainingArguments), "
                        f"got {type(args).__module__}.{type(args).__name__}")  # fmt: skip
    # the values as given to __init__ (to_dict would serialise enums and drop the hub token)
    fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    return SFTConfig(**{name: getattr(args, name) for name in fields})


def _load_chat_template(tokenizer, path: str) -> None:
    p = Path(path)
    if p.is_dir():
        from transformers import AutoTokenizer

        tokenizer.chat_template = AutoTokenizer.from_pretrained(p).chat_template
    elif p.is_file():
        tokenizer.chat_template = p.read_text(encoding="utf-8")
    else:
        raise ConfigError(f"SFTConfig.chat_template_path={path!r}: expected a Jinja template file or a tokenizer "
                          "directory, found nothing there")  # fmt: skip


def _ensure_distributed_from_env(args: TrainingArguments) -> None:
    """Join torchrun's process group now (the Trainer would a moment later) so that rank 0 prepares first."""
    from ..parallel import init_distributed_from_env

    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed_from_env(args.ddp_backend)


@contextlib.contextmanager
def _main_process_first():
    """Rank 0 prepares first and fills the datasets cache, the others then read it (no concurrent writers); only
    rank 0 shows the preparation's progress bars."""
    import datasets

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    main = dist.get_rank() == 0
    bars = datasets.is_progress_bar_enabled()
    if not main:
        datasets.disable_progress_bars()
        dist.barrier()
    try:
        yield
    finally:
        if main:
            dist.barrier()
        elif bars:
            datasets.enable_progress_bars()
