"""Tiny Llama, data and arguments shared by the training tests, and the runs they compare.

`reference_run` is transformers.Trainer on the Transformers model with vanilla PEFT (one process, or DDP when
called in every rank of a gloo spawn); `our_run` is optimum_neuron_peft.training.Trainer from the same model
directory and adapter at some tp size. Both return (log_history, trained adapter in original names, eval_loss of
`evaluate()` after training) on rank 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from safetensors.torch import load_file

# 4 query heads and 1 key/value head: at tp 2 and 4 the kv head is replicated (kv_size_multiplier > 1).
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, SEQ, SAMPLES = 64, 32, 64, 2, 4, 1, 16, 16
LOG_KEYS = ("loss", "grad_norm", "learning_rate", "num_input_tokens_seen")


def make_base(root: Path) -> Path:
    path = root / "base"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, rms_norm_eps=1e-5,
        )  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def dataset(samples: int = SAMPLES) -> list[dict[str, torch.Tensor]]:
    """Rows with different numbers of label tokens (a prompt masked with -100), so that the loss normalisation
    over accumulated micro-batches and data-parallel ranks matters."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(samples):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: (i * 5) % (SEQ - 2)] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return rows


def eval_dataset() -> list[dict[str, torch.Tensor]]:
    """6 rows: the last evaluation batch is short (eval batch size 4 in `common_args`)."""
    return dataset(22)[16:]


def lora_config() -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def common_args(**overrides: Any) -> dict[str, Any]:
    args = dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=2e-2,
        lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=0.05, weight_decay=0.01, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True, per_device_eval_batch_size=4,
        include_num_input_tokens_seen="all",
    )  # fmt: skip
    args.update(overrides)
    return args


def log_values(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The training entries of log_history (every key; the comparisons read `LOG_KEYS`)."""
    return [dict(e) for e in history if "loss" in e]


def adapter_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def make_adapter(root: Path) -> Path:
    """A vanilla PEFT adapter with non-zero lora_B, the starting point of every compared run."""
    path = root / "adapter"
    if not (path / "adapter_config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(make_base(root), dtype=torch.float32)
        torch.manual_seed(1)
        config = lora_config()
        config.init_lora_weights = False
        peft.get_peft_model(model, config).save_pretrained(str(path))
    return path


def reference_run(root: Path, out: Path, adapter: Path | None = None, **overrides: Any) -> tuple[list, dict] | None:
    """transformers.Trainer + vanilla PEFT; under a gloo spawn it runs DDP (use_cpu + the launcher's variables)."""
    import torch.distributed as dist

    if dist.is_initialized():
        os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()),
                          LOCAL_RANK=str(dist.get_rank()))  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(make_base(root), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(adapter or make_adapter(root)), is_trainable=True)
    args = transformers.TrainingArguments(output_dir=str(out), **common_args(**overrides))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   data_collator=transformers.default_data_collator)  # fmt: skip
    trainer.train()
    trainer.save_model(str(out / "final"))
    eval_loss = trainer.evaluate(eval_dataset())["eval_loss"]
    if dist.is_initialized():
        dist.barrier()
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(name, None)
        if dist.get_rank() != 0:
            return None
    return log_values(trainer.state.log_history), adapter_of(out / "final"), eval_loss


def one_process_eval(root: Path, run: Path) -> float:
    """transformers.Trainer's eval_loss, in one process, of the adapter a reference run saved in ``run/final``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(make_base(root), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(run / "final"))
    args = transformers.TrainingArguments(output_dir=str(run / "one_process_eval"), **common_args())
    trainer = transformers.Trainer(model=model, args=args, data_collator=transformers.default_data_collator)
    return trainer.evaluate(eval_dataset())["eval_loss"]


def our_run(root: Path, out: Path, tp: int, resume: str | bool | None = None, from_dir: bool = False,
            sequence_parallel: bool = False, **overrides: Any):
    """Our Trainer at tp (the rest of the world is dp); rank 0 returns the results.

    Default: the bring-your-own-model path (our model and `PeftModel.from_pretrained` of the shared vanilla
    adapter, layout read from the model). ``from_dir``: the Trainer builds the model from the directory and the
    LoRA config (original names).
    """
    import torch.distributed as dist

    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
    from optimum_neuron_peft.peft import PeftModel
    from optimum_neuron_peft.training import Trainer, TrainingArguments

    data = dict(train_dataset=dataset(), data_collator=transformers.default_data_collator)
    if from_dir:
        args = TrainingArguments(output_dir=str(out), tensor_parallel_size=tp, sequence_parallel=sequence_parallel,
                                 **common_args(**overrides))  # fmt: skip
        trainer = Trainer(model=str(make_base(root)), args=args, peft_config=lora_config(), **data)
    else:
        initialize_model_parallel(tensor_model_parallel_size=tp)
        model = AutoModelForCausalLM.from_pretrained(make_base(root), torch_dtype=torch.float32,
                                                     sequence_parallel=sequence_parallel)  # fmt: skip
        model = PeftModel.from_pretrained(model, make_adapter(root), is_trainable=True)
        args = TrainingArguments(output_dir=str(out), **common_args(**overrides))
        trainer = Trainer(model=model, args=args, **data)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))
    eval_loss = trainer.evaluate(eval_dataset())["eval_loss"]
    history = log_values(trainer.state.log_history)
    destroy_model_parallel()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return history, adapter_of(out / "final"), eval_loss


def worker(rank: int, world: int, root: str, runs: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any] | None:
    """Run ``runs`` = [(name, "ours" | "reference", kwargs)] one after the other in every rank of a spawn."""
    results = {}
    for name, kind, kwargs in runs:
        out = Path(root) / name
        result = our_run(Path(root), out, **kwargs) if kind == "ours" else reference_run(Path(root), out, **kwargs)
        results[name] = result
    return results if rank == 0 else None


def save_dir_initial_adapter(root: Path) -> Path:
    """The adapter the Trainer builds from the model directory and `lora_config()` (seeded with args.seed), as a
    vanilla PEFT adapter: the reference of the directory path starts from it."""
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
    from optimum_neuron_peft.training import TrainingArguments, build_model

    path = root / "dir_initial"
    initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        model = build_model(make_base(root), TrainingArguments(output_dir=str(root / "unused"), seed=0), lora_config())
        model.save_pretrained(path, consolidated=True)
    finally:
        destroy_model_parallel()
    return path
