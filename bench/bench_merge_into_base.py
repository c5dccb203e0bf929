"""Merge a LoRA adapter into a synthetic Llama base: optimum_neuron_peft vs PEFT merge_and_unload + save_pretrained.

The base (random bf16 weights, Llama layout, sharded safetensors + index) and an adapter (r=16 on every linear) are
written to a work directory; each merge runs in its own subprocess and reports wall time and peak RSS.

    python bench/bench_merge_into_base.py --size-gb 4 --work /tmp/merge_bench
    python bench/bench_merge_into_base.py --size-gb 4 --skip-peft   # ours only
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(work: Path, size_gb: float) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter = 2048, 5632
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 2
    layers = max(1, round((size_gb * 1e9 - 2 * 32000 * hidden * 2) / per_layer))
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, torch_dtype="bfloat16")
    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(base)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    # Shards of at most 1 GB, each generated and written on its own.
    weight_map, shard, size, files, total = {}, {}, 0, [], 0
    names = list(shapes)
    g = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, size
        if shard:
            files.append(shard)
            shard, size = {}, 0

    groups: list[list[str]] = []
    current: list[str] = []
    for name in names:
        nbytes = shapes[name].numel() * 2
        if current and size + nbytes > 1e9:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in group}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, base / filename, metadata={"format": "pt"})
        weight_map.update({n: filename for n in group})
        del tensors
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    with torch.device("meta"):
        small = LlamaForCausalLM(config)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(small.to_empty(device="cpu"), lora)
    adapter = work / "adapter"
    from peft.utils import get_peft_model_state_dict

    state = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in get_peft_model_state_dict(peft_model).items()}
    adapter.mkdir(exist_ok=True)
    save_file(state, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    lora_dict = peft_model.peft_config["default"].to_dict()
    lora_dict["target_modules"] = sorted(lora_dict["target_modules"])
    lora_dict["peft_type"] = "LORA"
    lora_dict["task_type"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(lora_dict, default=str))
    return base, adapter


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl: str, base: str, adapter: str, out: str) -> dict:
    # ru_maxrss is useless here: Linux carries the parent's peak over fork + exec, and the parent built the model.
    # VmHWM belongs to this process's own address space (reset by exec), so it is this merge's true peak.
    import torch  # noqa: F401  (imported before the baseline so both implementations start from the same point)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    baseline = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if impl == "ours":
        from optimum_neuron_peft.merging import merge_adapter_into_base

        merge_adapter_into_base(base, adapter, out, overwrite=True)
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out, max_shard_size="1GB")
    return {"seconds": time.perf_counter() - start, "peak_rss": _status_kib("VmHWM") * 1024, "baseline": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/merge_into_base_bench"))
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    base, adapter = build(args.work, args.size_gb)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"base: {size / 1e9:.2f} GB bf16 in {len(list(base.glob('*.safetensors')))} shards; adapter r=16 on 7 targets")
    print("| implementation | seconds | peak RSS | RSS after imports | peak RSS above imports | above imports / model size |")
    print("|---|---|---|---|---|---|")
    impls = ["ours"] if args.skip_peft else ["ours", "peft"]
    outputs = {}
    for impl in impls:
        out = args.work / f"out_{impl}"
        proc = subprocess.run([sys.executable, __file__, "--child", impl, str(base), str(adapter), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(1)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        outputs[impl] = out
        extra = r["peak_rss"] - r["baseline"]
        print(f"| {impl} | {r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} GiB | {r['baseline'] / 2**30:.2f} GiB "
              f"| {extra / 2**30:.2f} GiB | {extra / size:.2f} |", flush=True)
    if "peft" in outputs:
        from safetensors import safe_open

        same = True
        peft_files = {}
        for shard in sorted(outputs["peft"].glob("*.safetensors")):
            with safe_open(shard, "pt") as g:
                peft_files.update({name: shard for name in g.keys()})
        for shard in sorted(outputs["ours"].glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                for name in f.keys():
                    with safe_open(peft_files[name], "pt") as g:
                        same &= bool((f.get_tensor(name) == g.get_tensor(name)).all())
        print(f"every tensor identical to PEFT's: {same}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
