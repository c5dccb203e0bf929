"""The tensor-parallel LoRA training worker used by the demo (one call per rank, under torch.distributed)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..transformations.parallel_plan import LORA_TARGETS
from .task import batches, make_batch

DEFAULT_TARGETS = LORA_TARGETS  # every projection of a decoder layer (the parallel plan's)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 24
    learning_rate: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    dtype: str = "float32"  # of the base model; "bfloat16": bf16 base, fp32 LoRA and optimizer state (docs/peft.md)


@dataclass
class TrainResult:
    task: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    eval_logits: torch.Tensor | None = None  # full-vocabulary logits on the eval batch (tp rank 0 only)


def eval_batch(vocab_size: int, task: str) -> torch.Tensor:
    return make_batch(task, 4, 16, vocab_size, torch.Generator().manual_seed(1234))


def train_adapter(base_dir: Path, checkpoint_dir: Path, task: str, settings: TrainSettings) -> TrainResult:
    """Load the base model sharded over the tp group, train one LoRA adapter, save the sharded checkpoint."""
    from peft import LoraConfig

    from ..models import AutoModelForCausalLM
    from ..peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=settings.dtype)
    torch.manual_seed(settings.seed)  # same initial adapter on every rank and at every tp size
    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
        target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    vocab = model.config.vocab_size
    result = TrainResult(task)
    start = time.perf_counter()
    peft_model.train()
    for input_ids in batches(task, settings.steps, settings.batch_size, settings.seq_len, vocab, settings.seed + 1):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))  # the full-vocabulary loss, identical on every rank
    result.seconds = time.perf_counter() - start
    peft_model.save_pretrained(checkpoint_dir)  # collective: every rank writes its shard
    peft_model.eval()
    with torch.no_grad():
        result.eval_logits = peft_model(input_ids=eval_batch(vocab, task)).logits.detach().clone()
    return result


def demo_worker(rank: int, world_size: int, base_dir: str, checkpoint_root: str, tasks: list[str],
                settings: TrainSettings) -> list[TrainResult]:  # fmt: skip
    """Entry point of each spawned rank: tp = world size; trains one adapter per task."""
    from ..parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        results = [
            train_adapter(Path(base_dir), Path(checkpoint_root) / task, task, settings) for task in tasks
        ]
    finally:
        destroy_model_parallel()
    if rank != 0:
        for r in results:
            r.eval_logits = None
    return results
