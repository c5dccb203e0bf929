"""Benchmark: LoRA training steps, vanilla Transformers + PEFT vs ours, side by side in one run (issue 16).

Model (default): a Llama with hidden 1024, 8 layers, 16 heads / 4 kv heads, intermediate 2816, vocab 32000; LoRA
r=16 on all 7 projections; batch 2 x 512 tokens; AdamW. Every configuration runs in fresh processes (gloo), the
configurations alternate within each of ``--rounds`` rounds, and each reports the median of ``--steps`` steps after
``--warmup``. Configurations:

- ``gemm``: the machine's ceiling: the fp32 GEMMs of one frozen-base LoRA step (forward and input-gradient of
  every projection and the lm_head), timed alone with 2 threads and with 1 thread;
- ``vanilla``: Transformers + PEFT in one process, 2 threads and 1 thread;
- ``ours``: tp=1 (2 threads) and tp=2 (1 thread per rank), with/without sequence parallelism (sp), with/without
  activation checkpointing (ckpt), base in fp32 or bf16 (LoRA parameters and AdamW state fp32 in both).

Printed per configuration: step time, tokens/s, achieved FLOP/s and its ratio to the same-thread-count GEMM ceiling
(2 threads for one process with 2 threads, and for tp=2 with 1 thread on each of 2 ranks), peak RSS per rank and
in total, first-step loss. FLOP per step is counted for a frozen base: forward + input gradient of every base
matmul, forward + both gradients of the LoRA matmuls, attention (QK^T and AV) forward + backward. The per-process
baseline (python + torch + transformers + this package imported, nothing else) is measured too.

    python bench/bench_train_lora.py                  # the issue's model; ~15-20 min on 2 cores
    python bench/bench_train_lora.py --quick          # hidden 512, 4 layers, vocab 8192, seq 256: ~3 min
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 2816
    vocab: int = 32000
    batch: int = 2
    seq: int = 512
    r: int = 16

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every base matmul of one step's forward (lm_head included)."""
        hd = self.hidden // self.heads
        per_layer = [(self.hidden, self.hidden), (self.hidden, self.kv_heads * hd), (self.hidden, self.kv_heads * hd),
                     (self.hidden, self.hidden), (self.hidden, self.intermediate), (self.hidden, self.intermediate),
                     (self.intermediate, self.hidden)]  # fmt: skip
        return per_layer * self.layers + [(self.hidden, self.vocab)]

    def flop(self) -> float:
        t = self.tokens
        base = sum(2 * t * i * o for i, o in self.linears()) * 2  # forward + input gradient (frozen weights)
        lora = sum(2 * t * self.r * (i + o) for i, o in self.linears()[:-1]) * 3  # forward + 2 gradients
        hd = self.hidden // self.heads
        attention = 2 * (2 * self.batch * self.heads * self.seq * self.seq * hd) * 3 * self.layers
        return float(base + lora + attention)


def _peak_rss_mib() -> float:
    """Peak RSS of this process. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over execve, so a
    spawned worker would report at least its parent's RSS at the time of the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _hf_config(shape: Shape):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(shape.seq, 64), tie_word_embeddings=False,
    )  # fmt: skip


def _lora_config():
    import peft

    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)


def _ids(shape: Shape) -> torch.Tensor:
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))


def _time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    times, first_loss = [], None
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step()
        if first_loss is None:
            first_loss = loss
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), first_loss


# -- workers (one fresh process group per configuration) ---------------------------------------------------------


def baseline_worker(rank: int, world: int) -> dict:
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import optimum_neuron_peft.models  # noqa: F401
    import optimum_neuron_peft.peft  # noqa: F401

    return {"rss": _peak_rss_mib()}


def gemm_worker(rank: int, world: int, shape: Shape, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    t = shape.tokens
    pairs = []
    for i, o in dict.fromkeys(shape.linears()):
        count = shape.linears().count((i, o))
        pairs.append((torch.randn(t, i), torch.randn(o, i), torch.randn(t, o), count))
    flop = sum(2 * 2 * t * x.shape[1] * w.shape[0] * n for x, w, _, n in pairs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x, w, g, n in pairs:
            for _ in range(n):
                torch.mm(x, w.t())  # forward
                torch.mm(g, w)  # input gradient
        times.append(time.perf_counter() - start)
    return {"flop_per_s": flop / statistics.median(times)}


def vanilla_worker(rank: int, world: int, path: str, shape: Shape, threads: int, dtype: str, warmup: int, steps: int) -> dict:
    import peft
    import transformers

    torch.set_num_threads(threads)
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, _lora_config())
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = _ids(shape)

    def step() -> float:
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    median, first = _time_steps(step, warmup, steps)
    return {"step_s": median, "loss": first, "rss": _peak_rss_mib()}


def ours_worker(rank: int, world: int, path: str, shape: Shape, threads: int, dtype: str, sp: bool, ckpt: bool,
                warmup: int, steps: int) -> dict:  # fmt: skip
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
    from optimum_neuron_peft.peft import get_peft_model

    torch.set_num_threads(threads)
    initialize_model_parallel(world)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, sequence_parallel=sp)
        if ckpt:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)
        pm = get_peft_model(model, _lora_config())
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
        ids = _ids(shape)

        def step() -> float:
            loss = pm(input_ids=ids, labels=ids, return_logits=False).loss
            loss.backward()  # sequence-parallel gradients are reduced in backward: no manual call
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        median, first = _time_steps(step, warmup, steps)
        return {"step_s": median, "loss": first, "rss": _peak_rss_mib()}
    finally:
        destroy_model_parallel()


# -- driver ---------------------------------------------------------------------------------------------------


def configurations(args) -> list[tuple[str, dict]]:
    configs = [("vanilla 2 threads", dict(kind="vanilla", threads=2, dtype="float32")),
               ("vanilla 1 thread", dict(kind="vanilla", threads=1, dtype="float32")),
               ("ours tp=1 2 threads", dict(kind="ours", tp=1, threads=2, dtype="float32", sp=False, ckpt=False))]  # fmt: skip
    for dtype in ("float32", "bfloat16"):
        for sp in (False, True):
            for ckpt in (False, True):
                if args.quick and dtype == "bfloat16" and not sp:
                    continue
                name = f"ours tp=2 {'bf16' if dtype == 'bfloat16' else 'fp32'}{' sp' if sp else ''}{' ckpt' if ckpt else ''}"
                configs.append((name, dict(kind="ours", tp=2, threads=1, dtype=dtype, sp=sp, ckpt=ckpt)))
    return configs


def run(name: str, cfg: dict, path: str, shape: Shape, args) -> dict:
    from optimum_neuron_peft.parallel import spawn

    if cfg["kind"] == "vanilla":
        rows = spawn(vanilla_worker, 1, path, shape, cfg["threads"], cfg["dtype"], args.warmup, args.steps,
                     timeout_s=3600, num_threads=cfg["threads"])  # fmt: skip
    else:
        rows = spawn(ours_worker, cfg["tp"], path, shape, cfg["threads"], cfg["dtype"], cfg["sp"], cfg["ckpt"],
                     args.warmup, args.steps, timeout_s=3600, num_threads=cfg["threads"])  # fmt: skip
    return {"step_s": max(r["step_s"] for r in rows), "loss": rows[0]["loss"], "rss": [r["rss"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer configurations (~3 min)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in every worker (all configurations alike): blocks "
                             "above it are mmapped and returned to the OS when freed, instead of fragmenting the heap")  # fmt: skip
    args = parser.parse_args()
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # read by glibc when each worker starts
    shape = Shape(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1408, vocab=8192, seq=256) if args.quick else Shape()

    import transformers

    from optimum_neuron_peft.parallel import spawn

    root = Path(tempfile.mkdtemp(prefix="bench_lora_", dir="/tmp"))
    try:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(_hf_config(shape)).save_pretrained(root, safe_serialization=True)
        flop = shape.flop()
        print(f"Llama hidden {shape.hidden}, {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, "
              f"intermediate {shape.intermediate}, vocab {shape.vocab}; LoRA r={shape.r} on 7 projections; batch "
              f"{shape.batch} x {shape.seq}; AdamW; {flop / 1e9:.0f} GFLOP per step (frozen base); median of "
              f"{args.steps} steps after {args.warmup} warm-up, best of {args.rounds} rounds"
              + (f"; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""), flush=True)  # fmt: skip
        baseline = spawn(baseline_worker, 1, timeout_s=600)[0]["rss"]
        gemm = {t: max(spawn(gemm_worker, 1, shape, t, 3, timeout_s=3600, num_threads=t)[0]["flop_per_s"]
                       for _ in range(args.rounds)) for t in (2, 1)}  # fmt: skip
        configs = configurations(args)
        results: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for round_index in range(args.rounds):
            for name, cfg in configs:  # alternating: a slow phase of the shared machine hits every configuration
                print(f"  round {round_index + 1}/{args.rounds}: {name} ...", flush=True)
                results[name].append(run(name, cfg, str(root), shape, args))
        vanilla2 = min(r["step_s"] for r in results["vanilla 2 threads"])
        vanilla_rss = results["vanilla 2 threads"][0]["rss"][0]
        print()
        print(f"per-process baseline (python + torch + transformers + peft + this package): {baseline:.0f} MiB")
        print(f"GEMM ceiling fp32: 2 threads {gemm[2] / 1e9:.1f} GFLOP/s, 1 thread {gemm[1] / 1e9:.1f} GFLOP/s")
        header = (f"{'configuration':<26} {'step s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'of GEMM':>8} {'vs van.2t':>9} "
                  f"{'RSS/rank MiB':>14} {'RSS total':>10} {'RSS/van.':>9} {'loss step 1':>12}")  # fmt: skip
        print(header)
        print("-" * len(header))
        for name, cfg in configs:
            best = min(results[name], key=lambda r: r["step_s"])
            step = best["step_s"]
            threads_total = cfg["threads"] * cfg.get("tp", 1)
            ceiling = gemm[2] if threads_total >= 2 else gemm[1]
            achieved = flop / step
            rss = best["rss"]
            print(f"{name:<26} {step:>7.2f} {shape.tokens / step:>9.0f} {achieved / 1e9:>8.1f} "
                  f"{achieved / ceiling:>8.0%} {vanilla2 / step:>8.2f}x {'/'.join(f'{x:.0f}' for x in rss):>14} "
                  f"{sum(rss):>10.0f} {max(rss) / vanilla_rss:>8.2f}x {best['loss']:>12.6f}")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
