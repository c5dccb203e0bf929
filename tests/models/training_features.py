"""Worker for the activation-checkpointing and sequence-parallel gradient tests (`test_training_features.py`).

`run_all(root, tp_size)` runs, on each rank, one forward/backward per configuration of a tiny Llama (bias, GQA,
attention dropout) from the same seed, and returns this rank's LOCAL gradients per configuration. Configurations
differ only by activation checkpointing, sequence parallelism and dropout, which never change the local shapes, so
gradients are compared rank by rank. No run calls ``allreduce_sequence_parallel_gradients``: the sequence-parallel
reduction must happen in backward by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import torch
import transformers

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, BATCH, SEQ = 64, 32, 64, 2, 4, 2, 2, 8


def build_base(root: Path, dropout: float) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, attention_bias=True,
        mlp_bias=True, attention_dropout=dropout,
    )  # fmt: skip
    path = root / f"base_dropout{dropout}"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def grads_of(root: Path, lora: bool, dropout: float, sp: bool, checkpointing: bool) -> dict[str, Any]:
    """Local gradients of every trainable parameter after one forward/backward (full fine-tuning or LoRA)."""
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(root / f"base_dropout{dropout}", sequence_parallel=sp)
    trained: torch.nn.Module = model
    if lora:
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout,
                                 init_lora_weights=False)  # fmt: skip
        trained = get_peft_model(model, config)
    if checkpointing:  # on the PeftModel for LoRA: PEFT forwards the call to our model, as Transformers' Trainer does
        trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_gradient_checkpointing
    trained.train()
    calls = []  # forward runs of layer 0: 2 when its activations were recomputed in backward
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    ids = batch()
    torch.manual_seed(2)  # the dropout masks: the same stream in every configuration
    out = trained(input_ids=ids, labels=ids, return_logits=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # The old manual call must change nothing any more (no double reduction).
    model.allreduce_sequence_parallel_gradients()
    unchanged = all(torch.equal(p.grad, grads[n]) for n, p in trained.named_parameters() if p.requires_grad)
    return {"loss": out.loss.detach(), "grads": grads, "manual_call_changed_nothing": unchanged,
            "layer0_forward_runs": len(calls)}  # fmt: skip


CONFIGS = [  # (name, lora, dropout, sp, checkpointing)
    (f"{kind}_drop{dropout}_sp{int(sp)}_ckpt{int(ckpt)}", kind == "lora", dropout, sp, ckpt)
    for kind in ("full", "lora")
    for dropout in (0.0, 0.1)
    for sp in (False, True)
    for ckpt in (False, True)
]


def run_all(root: Path, tp_size: int) -> dict[str, Any]:
    return {
        name: grads_of(root, lora, dropout, sp, ckpt)
        for name, lora, dropout, sp, ckpt in CONFIGS
        if not (sp and tp_size == 1)
    }


def worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(world_size)
    try:
        return run_all(Path(root), world_size)
    finally:
        destroy_model_parallel()
