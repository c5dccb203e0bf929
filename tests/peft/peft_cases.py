"""Tiny Llama + vanilla PEFT references, and the worker that runs the same adapters on our tensor-parallel models.

The parent (`build_references`) saves a tiny Transformers Llama, and for every case a vanilla PEFT adapter with
non-zero lora_B (``init_lora_weights=False``), then trains vanilla PEFT K steps on fixed batches and keeps the
adapter after each step and the initial logits. `worker` runs in every rank of one spawn (and in-process at tp=1):
it loads each adapter with our `PeftModel.from_pretrained`, runs the same K steps and returns, on rank 0, the
consolidated adapters (gathered from every tp rank and rebuilt through the specs), logits, and other checks.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, BATCH, SEQ = 64, 32, 64, 2, 8, 2, 2, 8
STEPS, LR = 3, 0.5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    configs: dict[str, dict[str, Any]]  # adapter name -> LoraConfig kwargs (original names)
    fuse_qkv: bool = False
    sequence_parallel: bool = False


CASES = [
    Case("all_linear", {"default": dict(r=4, lora_alpha=8, target_modules="all-linear")}),
    Case("qv_fused_rslora_patterns", {"default": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
    )}, fuse_qkv=True),  # fmt: skip
    Case("mlp_embed_head_sp", {"default": dict(
        r=2, lora_alpha=4, target_modules=["gate_proj", "down_proj", "embed_tokens", "lm_head"],
    )}, sequence_parallel=True),  # fmt: skip
    Case("regex_and_layers", {"default": dict(
        r=4, lora_alpha=4, target_modules=r".*\.layers\.1\..*(k_proj|up_proj|o_proj)",
    )}, fuse_qkv=True, sequence_parallel=True),  # fmt: skip
    Case("two_adapters", {
        "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "other": dict(r=2, lora_alpha=2, target_modules=["k_proj", "up_proj", "down_proj"], layers_to_transform=[0]),
    }),  # fmt: skip
]
INIT_CONFIGS = {
    "init_default": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "init_gaussian": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="gaussian"),
    "init_false_embed": dict(r=2, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "embed_tokens", "lm_head"],
                             init_lora_weights=False),
}  # fmt: skip


def hf_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, rms_norm_eps=1e-5,
    )  # fmt: skip


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def lora_config(kwargs: dict[str, Any]) -> peft.LoraConfig:
    kwargs = dict(kwargs)
    kwargs.setdefault("init_lora_weights", False)
    return peft.LoraConfig(lora_dropout=0.0, **kwargs)


def adapter_tensors(model: peft.PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """Vanilla PEFT adapter in original names (no ``base_model.model.``), as saved."""
    sd = peft.get_peft_model_state_dict(model, adapter_name=adapter)
    return {k.removeprefix("base_model.model."): v.detach().clone() for k, v in sd.items()}


def build_references(root: Path) -> dict[str, Any]:
    """Save the base model and every case's adapters under ``root``; return the vanilla results."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(hf_config()).eval()
    base.save_pretrained(root / "base")
    refs: dict[str, Any] = {}
    for case in CASES:
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        names = list(case.configs)
        pm = peft.get_peft_model(model, lora_config(case.configs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            pm.add_adapter(name, lora_config(case.configs[name]))
        for name in names:
            pm.save_pretrained(str(root / case.name), selected_adapters=[name])  # non-default go to a subdir
        pm.base_model.set_adapter(names)  # all adapters active and trainable
        initial = {name: adapter_tensors(pm, name) for name in names}
        ids = batches()
        with torch.no_grad():
            logits = pm(input_ids=ids[0]).logits
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR, momentum=0.9)
        for step in range(STEPS):
            loss = pm(input_ids=ids[step], labels=ids[step]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        refs[case.name] = {"initial": initial, "logits": logits,
                           "trained": {name: adapter_tensors(pm, name) for name in names}}  # fmt: skip
    return refs


def adapter_dir(root: Path, case: Case, adapter: str) -> Path:
    return root / case.name if adapter == "default" else root / case.name / adapter


def run_case(root: Path, case: Case, tp_rank: int) -> dict[str, Any]:
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(
        root / "base", fuse_qkv=case.fuse_qkv, sequence_parallel=case.sequence_parallel
    )
    names = list(case.configs)
    pm = PeftModel.from_pretrained(model, adapter_dir(root, case, names[0]), adapter_name=names[0], is_trainable=True)
    for name in names[1:]:
        pm.load_adapter(adapter_dir(root, case, name), adapter_name=name, is_trainable=True)
    pm.base_model.set_adapter(names)
    out: dict[str, Any] = {"loaded": {name: pm.consolidated_adapter_state_dict(name) for name in names}}
    pm.save_pretrained(root / "sharded" / f"{case.name}_tp{model.tp.size}")  # consolidated by the parent
    ids = batches()
    with torch.no_grad():
        out["logits"] = pm(input_ids=ids[0]).logits
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    for step in range(STEPS):
        loss = pm(input_ids=ids[step], labels=ids[step], return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out["trained"] = {name: pm.consolidated_adapter_state_dict(name) for name in names}
    # merge / unmerge on the shards: merged logits equal the adapter's, unmerge restores the base bit-exactly
    base_before = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        lora_logits = pm(input_ids=ids[0]).logits
        pm.base_model.merge_adapter(names)
        merged_logits = pm(input_ids=ids[0]).logits
        pm.base_model.unmerge_adapter()
    out["merge_max_diff"] = (lora_logits - merged_logits).abs().max().item()
    out["unmerge_exact"] = all(torch.equal(p, base_before[n]) for n, p in pm.named_parameters() if n in base_before)
    return out


def run_init(root: Path) -> dict[str, Any]:
    """Consolidated initial adapters of `get_peft_model` for a fixed seed (must not depend on tp)."""
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.peft import get_peft_model

    out = {}
    for name, kwargs in INIT_CONFIGS.items():
        model = AutoModelForCausalLM.from_pretrained(root / "base")
        torch.manual_seed(1234)
        pm = get_peft_model(model, peft.LoraConfig(**kwargs))
        out[name] = pm.consolidated_adapter_state_dict("default")
    return out


def run_all(root: Path, tp_rank: int) -> dict[str, Any]:
    results: dict[str, Any] = {"init": run_init(root)}
    for case in CASES:
        results[case.name] = run_case(root, case, tp_rank)
    return results


def worker(rank: int, world_size: int, root: str, tp_sizes: list[int]) -> dict[int, Any] | None:
    """Spawned entry point: run every case for each tp size; rank 0 returns {tp: results}."""
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel

    torch.manual_seed(0)
    results = {}
    for tp_size in tp_sizes:
        initialize_model_parallel(tp_size)
        try:
            results[tp_size] = run_all(Path(root), rank % tp_size)
        finally:
            destroy_model_parallel()
    return results if rank == 0 else None
