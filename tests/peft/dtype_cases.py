"""Every LoRA path in bf16 and fp32: references from vanilla PEFT on a Transformers base of that dtype, and the worker
that runs the same paths on our tensor-parallel models (get_peft_model, load adapter, train, save, consolidate,
resume).

The parent (`build_references`) saves a tiny fp32 Llama and a vanilla PEFT adapter (non-zero lora_B), then, per
dtype, loads the base in that dtype (``torch_dtype``), loads the adapter with vanilla `peft.PeftModel` (which keeps
the adapter in fp32: its ``autocast_adapter_dtype``) and records the logits and the adapter after K SGD steps.
`worker` does the same with our `PeftModel.from_pretrained` at each tp size and returns, on rank 0, consolidated
adapters and logits, plus the sharded and consolidated directories it saved.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft_cases import adapter_tensors, batches, hf_config, lora_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STEPS, LR = 3, 0.5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    lora: dict[str, Any]
    fuse_qkv: bool = False
    sequence_parallel: bool = False


CASES = [
    Case("all_linear", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    Case("all_linear_fused_sp_embed", dict(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]),
        fuse_qkv=True, sequence_parallel=True),  # fmt: skip
]
INIT_CONFIG = dict(r=4, lora_alpha=8, target_modules="all-linear")


def build_references(root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config()).save_pretrained(root / "base")
    refs: dict[str, Any] = {}
    for case in CASES:
        base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        torch.manual_seed(1)
        peft.get_peft_model(base, lora_config(case.lora)).save_pretrained(str(root / case.name))
    for dtype_name, dtype in DTYPES.items():
        base = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=dtype)
        refs[dtype_name] = {"shapes": {k: tuple(v.shape) for k, v in adapter_tensors(
            peft.get_peft_model(base, peft.LoraConfig(**INIT_CONFIG)), "default").items()}}  # fmt: skip
        for case in CASES:
            base = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=dtype)
            pm = peft.PeftModel.from_pretrained(base, str(root / case.name), is_trainable=True)
            ids = batches()
            with torch.no_grad():
                logits = pm(input_ids=ids[0]).logits.float()
            opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR, momentum=0.9)
            for step in range(STEPS):
                pm(input_ids=ids[step], labels=ids[step]).loss.backward()
                opt.step()
                opt.zero_grad()
            refs[dtype_name][case.name] = {
                "initial": adapter_tensors(peft.PeftModel.from_pretrained(
                    transformers.LlamaForCausalLM.from_pretrained(root / "base"), str(root / case.name)), "default"),
                "logits": logits, "trained": adapter_tensors(pm, "default"),
                "lora_dtypes": {p.dtype for n, p in pm.named_parameters() if "lora_" in n},
            }  # fmt: skip
    return refs


def _policy(pm: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """Dtypes and tensor-parallel attributes of the parameters (the bf16 policy and the defect of issue 16)."""
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    base = {n: p for n, p in pm.named_parameters() if "lora_" not in n}
    return {
        "lora_dtypes": {p.dtype for p in lora.values()},
        "base_dtypes": {p.dtype for p in base.values()},
        "lora_without_tp_attributes": sorted(n for n, p in lora.items() if not hasattr(p, "partition_dim")),
        "lora_requires_grad": all(p.requires_grad for p in lora.values()),
    }


def run_dtype(root: Path, dtype_name: str, tp_size: int) -> dict[str, Any]:
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.peft import PeftModel, get_peft_model

    dtype = DTYPES[dtype_name]
    out: dict[str, Any] = {}
    # get_peft_model: the new adapter, saved sharded and consolidated
    model = AutoModelForCausalLM.from_pretrained(root / "base", torch_dtype=dtype)
    torch.manual_seed(1234)
    pm = get_peft_model(model, peft.LoraConfig(**INIT_CONFIG))
    out["init"] = {"policy": _policy(pm, dtype), "consolidated": pm.consolidated_adapter_state_dict()}
    pm.save_pretrained(root / "out" / f"init_{dtype_name}_tp{tp_size}_sharded")
    pm.save_pretrained(root / "out" / f"init_{dtype_name}_tp{tp_size}_consolidated", consolidated=True)
    for case in CASES:
        model = AutoModelForCausalLM.from_pretrained(root / "base", torch_dtype=dtype, fuse_qkv=case.fuse_qkv,
                                                     sequence_parallel=case.sequence_parallel)  # fmt: skip
        pm = PeftModel.from_pretrained(model, root / case.name, is_trainable=True)
        res: dict[str, Any] = {"policy": _policy(pm, dtype), "loaded": pm.consolidated_adapter_state_dict()}
        ids = batches()
        with torch.no_grad():
            logits = pm(input_ids=ids[0]).logits
        res["logits"], res["logits_dtype"] = logits.float(), logits.dtype
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR, momentum=0.9)
        for step in range(STEPS):
            loss = pm(input_ids=ids[step], labels=ids[step], return_logits=False).loss
            loss.backward()
            res.setdefault("grad_dtypes", set()).update(p.grad.dtype for p in pm.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad()
        res["optimizer_state_dtypes"] = {v.dtype for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
        res["trained"] = pm.consolidated_adapter_state_dict()
        trained_dir = root / "out" / f"{case.name}_{dtype_name}_tp{tp_size}"
        pm.save_pretrained(trained_dir / "sharded")
        pm.save_pretrained(trained_dir / "consolidated", consolidated=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # one rank wrote the consolidated directory; the others read it next
        # resume: the saved adapter loads back into a fresh model of the same dtype, bit-exactly
        model = AutoModelForCausalLM.from_pretrained(root / "base", torch_dtype=dtype, fuse_qkv=case.fuse_qkv,
                                                     sequence_parallel=case.sequence_parallel)  # fmt: skip
        resumed = PeftModel.from_pretrained(model, trained_dir / "consolidated", is_trainable=True)
        res["resumed"] = resumed.consolidated_adapter_state_dict()
        out[case.name] = res
    return out


def run_all(root: Path, tp_size: int) -> dict[str, Any]:
    return {dtype_name: run_dtype(root, dtype_name, tp_size) for dtype_name in DTYPES}


def worker(rank: int, world_size: int, root: str, tp_sizes: list[int]) -> dict[int, Any] | None:
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel

    results = {}
    for tp_size in tp_sizes:
        initialize_model_parallel(tp_size)
        try:
            results[tp_size] = run_all(Path(root), tp_size)
        finally:
            destroy_model_parallel()
    return results if rank == 0 else None
