"""Tiny Llama-family checkpoints, their Transformers references, and the worker that runs our models on them.

The parent builds each case's Transformers model from a fixed seed, saves it with ``save_pretrained`` and computes
the reference logits, loss, gradients (and weights after a few SGD steps). `run_cases` runs in every rank of
one spawn per world size (tp = world size), loads every case with `AutoModelForCausalLM.from_pretrained`, and rank 0
returns the consolidated results (gradients and weights rebuilt through the specs with `to_original_weights`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers

from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.models import AutoModelForCausalLM
from optimum_neuron_peft.parallel import GQAQKVColumnParallelLinear, destroy_model_parallel, initialize_model_parallel
from optimum_neuron_peft.transformations import to_original_weights

VOCAB, HIDDEN, INTER, LAYERS, HEADS, BATCH, SEQ = 128, 64, 96, 2, 8, 2, 8
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    arch: str  # llama | mistral | qwen3 | granite
    kv_heads: int = 2
    fuse_qkv: bool = False
    sequence_parallel: bool = False
    tied: bool = False
    bias: bool = False
    padding: bool = False
    kv_size_multiplier: int | None = None
    train_steps: int = 0  # > 0: SGD (momentum) steps of full fine-tuning instead of one forward/backward


FORWARD_CASES = [
    Case("llama", "llama", padding=True),
    Case("llama_fused_sp_tied", "llama", fuse_qkv=True, sequence_parallel=True, tied=True),
    Case("llama_bias_sp_mask", "llama", bias=True, sequence_parallel=True, padding=True),
    Case("llama_kv1_fused_m_explicit", "llama", kv_heads=1, fuse_qkv=True, kv_size_multiplier=None),
    Case("mistral_window_sp_mask", "mistral", sequence_parallel=True, padding=True),
    Case("qwen3_fused_tied", "qwen3", fuse_qkv=True, tied=True, padding=True),
    Case("qwen3_sp", "qwen3", sequence_parallel=True),
    Case("granite_bias_fused_sp", "granite", bias=True, fuse_qkv=True, sequence_parallel=True, padding=True),
    Case("granite_tied", "granite", tied=True),
]
TRAIN_CASES = [
    Case("train_llama_kv1_fused_sp_tied", "llama", kv_heads=1, fuse_qkv=True, sequence_parallel=True, tied=True,
         train_steps=3),  # fmt: skip
    Case("train_qwen3_bias", "qwen3", bias=True, padding=True, train_steps=3),
]


def hf_config(case: Case) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=case.kv_heads, max_position_embeddings=64, pad_token_id=0,
        tie_word_embeddings=case.tied, rms_norm_eps=1e-6,
    )  # fmt: skip
    if case.arch == "llama":
        return transformers.LlamaConfig(**common, attention_bias=case.bias, mlp_bias=case.bias, rope_parameters=LLAMA3_ROPE)
    if case.arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=3)
    if case.arch == "qwen3":
        return transformers.Qwen3Config(**common, attention_bias=case.bias, head_dim=16)
    if case.arch == "granite":
        return transformers.GraniteConfig(
            **common, attention_bias=case.bias, mlp_bias=case.bias, embedding_multiplier=3.0,
            attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.5,
        )  # fmt: skip
    raise ValueError(case.arch)


def batches(case: Case, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(max(steps, 1)):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        if case.padding:
            mask[0, -3:] = 0  # right padding
            mask[1, :2] = 0  # left padding
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask if case.padding else None, "labels": labels})
    return out


def reference(case: Case, root: Path) -> dict[str, Any]:
    """Save the Transformers model of ``case`` under ``root/case.name`` and compute what ours must reproduce."""
    torch.manual_seed(hash(case.name) % 1000)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "granite": transformers.GraniteForCausalLM}[case.arch]  # fmt: skip
    model = cls(hf_config(case)).float()
    with torch.no_grad():  # make norms and biases non-trivial so that their gradients and uses are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = root / case.name
    model.save_pretrained(path, safe_serialization=True)
    data = batches(case, case.train_steps)
    if case.train_steps:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for batch in data:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        return {"path": str(path), "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    out = model(**data[0])
    out.loss.backward()
    return {
        "path": str(path), "logits": out.logits.detach(), "loss": out.loss.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }  # fmt: skip


def _gather_to_rank0(model, tensors: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor] | None:
    """{original name: full tensor} rebuilt through the specs from every rank's {our name: local tensor}."""
    if world == 1:
        per_rank = [tensors]
    else:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, tensors)
    sharded = {name: [r[name] for r in per_rank] for name in tensors}
    return to_original_weights(model.transformation_specs(), sharded, model.parameters_metadata()["parameters"])


def _replica_mismatch(model, world: int) -> float:
    """Largest difference between slots holding the same key/value head (all ranks); replicas must stay equal."""
    worst = 0.0
    for module in model.modules():
        if not isinstance(module, GQAQKVColumnParallelLinear):
            continue
        weight = module.weight_qkv[module.q_size :] if module.fuse_qkv else torch.cat([module.weight_k, module.weight_v])
        local = (module.kv_head_indices, weight.detach())
        per_rank = [local] if world == 1 else [None] * world
        if world > 1:
            dist.all_gather_object(per_rank, local)
        first: dict[tuple[int, int], torch.Tensor] = {}
        for heads, w in per_rank:
            k, v = w.chunk(2)
            for kind, t in (("k", k), ("v", v)):
                for slot, head in enumerate(heads):
                    rows = t[slot * module.head_dim : (slot + 1) * module.head_dim]
                    key = (kind, head)
                    if key in first:
                        worst = max(worst, (rows - first[key]).abs().max().item())
                    else:
                        first[key] = rows
    return worst


def run_case(case: Case, ref_path: str, world: int, rank: int) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(
        ref_path, fuse_qkv=case.fuse_qkv, sequence_parallel=case.sequence_parallel,
        kv_size_multiplier=case.kv_size_multiplier,
    )  # fmt: skip
    data = batches(case, case.train_steps)
    if case.train_steps:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for batch in data:
            opt.zero_grad()
            model(**batch, return_logits=False).loss.backward()
            model.allreduce_sequence_parallel_gradients()
            opt.step()
        weights = _gather_to_rank0(model, model.sharded_state_dict(), world)
        saved = model.save_pretrained(f"{ref_path}_saved_tp{world}")  # collective over the tp group
        if rank == 0:
            files = sorted(p.name for p in saved.rglob("*") if p.is_file())
            assert sum("tp_rank_" in f for f in files) == world, files
        return {"weights": weights if rank == 0 else None, "replica_mismatch": _replica_mismatch(model, world)}
    out = model(**data[0])
    out.loss.backward()
    model.allreduce_sequence_parallel_gradients()
    grads = {n: p.grad.detach() for n, p in model.named_parameters()}
    consolidated = _gather_to_rank0(model, grads, world)
    return {
        "loss": out.loss.detach(), "logits": out.logits.detach() if rank == 0 else None,
        "grads": consolidated if rank == 0 else None,
    }  # fmt: skip


def run_cases(rank: int, world: int, table: list[tuple[Case, str]]) -> dict[str, Any]:
    """Worker: tp = world; every case of the table; an exception is recorded per case, not raised."""
    import traceback

    results = {}
    if world > 1:  # before the groups exist: a tp size (1) that does not fill the world must be refused
        try:
            AutoModelForCausalLM.from_pretrained(table[0][1])
            results["world_mismatch"] = "no error"
        except ConfigError as e:
            results["world_mismatch"] = str(e)
        initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        for case, path in table:
            try:
                results[case.name] = run_case(case, path, world, rank)
            except Exception:
                results[case.name] = {"error": traceback.format_exc()}
    finally:
        if world > 1:
            destroy_model_parallel()
    return results
