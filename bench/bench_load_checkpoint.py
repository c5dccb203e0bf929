"""Benchmark: loading a ~2 GB Llama-shaped safetensors checkpoint at tp = 4, lazy slices vs full state dict.

Writes a synthetic checkpoint (random fp32 weights, two index-sharded files) under a temporary directory in /tmp,
then, in a fresh group of ``--tp`` gloo processes for each method:

- ``lazy``: `AutoModelForCausalLM.from_pretrained` (meta model; a row range that stays as it is is a view of a
  ``safe_open`` map of its own, a column range is copied out of one, rows that are concatenated (gate/up) are read
  straight into the result);
- ``full``: every rank ``safetensors.torch.load_file`` on every file, then shards it with `adapt_state_dict`.

Per rank: wall time and CPU time (user + sys: the work itself, less sensitive than wall time to 4 ranks sharing 2
cores) of the load, peak RSS above the baseline measured after imports and process-group setup (VmHWM), and the
bytes of checkpoint data the rank reads (the slices it asks for, resp. the whole files). Both methods leave row
slices as views of memory-mapped files whose pages come in on first use, so each rank then reads every page of
its parameters once (as a first forward pass would): "touch s" and "touched RSS MiB" (peak above baseline after
that) show what the load deferred. Setup (imports, process group, a first ``AutoConfig.from_pretrained``, whose
one-time import of transformers' model registry costs both methods ~1 s of CPU) is not timed. Deletes the
checkpoint at the end.

    python bench/bench_load_checkpoint.py [--tp 4] [--layers 8] [--hidden 2048] [--repeats 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def write_checkpoint(root: Path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    from safetensors.torch import save_file

    hd = hidden // heads
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "float32", "hidden_act": "silu",
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.empty(shape).normal_(0, 0.02, generator=gen)

    files = [{"model.embed_tokens.weight": rand(vocab, hidden)}, {}]
    for i in range(layers):
        p = f"model.layers.{i}."
        part = files[0] if i < layers // 2 else files[1]
        part.update({
            p + "self_attn.q_proj.weight": rand(heads * hd, hidden), p + "self_attn.k_proj.weight": rand(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * hd, hidden), p + "self_attn.o_proj.weight": rand(hidden, heads * hd),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter), p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        })  # fmt: skip
    files[1]["model.norm.weight"] = torch.ones(hidden)
    files[1]["lm_head.weight"] = rand(vocab, hidden)
    weight_map, total = {}, 0
    for i, tensors in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, root / name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    files.clear()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> float:
    """Reset the peak RSS (VmHWM) to the current RSS and return it.

    ru_maxrss is not usable here: Linux carries it over fork + exec, so a spawned worker starts with the peak of
    the parent that wrote the checkpoint. VmHWM belongs to the new address space and ``clear_refs`` resets it.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _touch_every_page(model: torch.nn.Module) -> float:
    """Read one element per 4 KiB page of every parameter (cheap compute, every page brought in)."""
    with torch.no_grad():
        return sum(float(p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()) for p in model.parameters())


T0 = time.perf_counter()  # set again when a spawned worker imports this module


def worker(rank: int, world: int, path: str, method: str) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from optimum_neuron_peft.models import AutoModelForCausalLM, LlamaForCausalLM, ParallelPlan
    from optimum_neuron_peft.models.auto import resolve_tensor_parallel
    from optimum_neuron_peft.models.loading import assign_parameters, checkpoint_weight_map
    from optimum_neuron_peft.parallel import initialize_model_parallel
    from optimum_neuron_peft.transformations import adapt_state_dict

    initialize_model_parallel(tensor_model_parallel_size=world)
    AutoConfig.from_pretrained(path)  # its first call imports transformers' model registry (~1 s CPU): setup
    torch.distributed.barrier()
    import_s = time.perf_counter() - T0
    baseline = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), _cpu_s()
    if method == "lazy":
        model = AutoModelForCausalLM.from_pretrained(path)
        read = sum(p.numel() * p.element_size() for p in model.parameters())  # exactly the slices it asked for
    else:
        hf_config = AutoConfig.from_pretrained(path)
        plan = ParallelPlan(resolve_tensor_parallel(), dtype=torch.float32, device="meta", initialize=False)
        model = LlamaForCausalLM(hf_config, plan)
        full = {}
        for file in sorted(set(checkpoint_weight_map(path).values())):
            full.update(load_file(file))
        read = sum(t.numel() * t.element_size() for t in full.values())
        local = adapt_state_dict(model, full, model.tp.rank)
        del full
        assign_parameters(model, local)
    elapsed, cpu = time.perf_counter() - start, _cpu_s() - cpu_start
    peak = _status_mib("VmHWM") - baseline
    start = time.perf_counter()
    _touch_every_page(model)
    touch = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    torch.distributed.barrier()
    return {"rank": rank, "seconds": elapsed, "cpu_s": cpu, "peak_rss_mib": peak, "touch_s": touch,
            "touched_rss_mib": _status_mib("VmHWM") - baseline, "import_s": import_s, "baseline_mib": baseline,
            "read_mib": read / 2**20, "local_params_mib": params / 2**20, "largest_slice_mib": largest / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", help="write the checkpoint here and keep it")
    parser.add_argument("--repeats", type=int, default=5, help="groups per method, in alternating order")
    args = parser.parse_args()

    from optimum_neuron_peft.parallel import spawn

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_load_", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        total = write_checkpoint(root, args.hidden, args.intermediate, args.layers, 16, 4, args.vocab)
        print(f"checkpoint: {total / 2**30:.2f} GiB fp32 in {root} (written in {time.perf_counter() - t:.1f} s), "
              f"tp = {args.tp}, {os.cpu_count()} cores")  # fmt: skip
        print(f"{'run':>3} {'method':<6} {'rank':>4} {'wall s':>7} {'cpu s':>6} {'read MiB':>9} {'peak RSS MiB':>13} "
              f"{'params MiB':>11} {'bound MiB':>10} {'touch s':>8} {'touched RSS MiB':>16} {'baseline MiB':>13} {'setup s':>8}")  # fmt: skip
        means: dict[str, list[tuple[float, float]]] = {"lazy": [], "full": []}
        peaks: dict[str, float] = {"lazy": 0.0, "full": 0.0}
        for run in range(args.repeats):
            # Alternate the order: the second group of a pair may find a warmer (or busier) machine.
            for method in ("lazy", "full") if run % 2 == 0 else ("full", "lazy"):
                rows = spawn(worker, args.tp, str(root), method, timeout_s=900)
                for r in rows:
                    bound = total / 2**20 / args.tp + 1.5 * r["largest_slice_mib"]
                    print(f"{run:>3} {method:<6} {r['rank']:>4} {r['seconds']:>7.2f} {r['cpu_s']:>6.2f} {r['read_mib']:>9.0f} "
                          f"{r['peak_rss_mib']:>13.0f} {r['local_params_mib']:>11.0f} {bound:>10.0f} {r['touch_s']:>8.2f} "
                          f"{r['touched_rss_mib']:>16.0f} {r['baseline_mib']:>13.0f} {r['import_s']:>8.1f}")  # fmt: skip
                means[method].append((statistics.mean(r["seconds"] for r in rows), statistics.mean(r["cpu_s"] for r in rows)))
                peaks[method] = max(peaks[method], max(r["peak_rss_mib"] for r in rows))
        print(f"\nover {args.repeats} runs (per run: the mean over ranks), bound {bound:.0f} MiB")
        print(f"{'method':<6} {'median wall s':>14} {'min':>6} {'max':>6} {'median cpu s':>13} {'max peak RSS MiB':>17}")
        for method, values in means.items():
            walls, cpus = [w for w, _ in values], [c for _, c in values]
            print(f"{method:<6} {statistics.median(walls):>14.3f} {min(walls):>6.3f} {max(walls):>6.3f} "
                  f"{statistics.median(cpus):>13.3f} {peaks[method]:>17.0f}")  # fmt: skip
        ratio = statistics.median(w for w, _ in means["lazy"]) / statistics.median(w for w, _ in means["full"])
        print(f"lazy / full median wall time: {ratio:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
