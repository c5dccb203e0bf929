"""Benchmark: one full fine-tuning step (forward, backward, SGD) of a small Llama at tp = 1 and tp = 2 on CPU/gloo.

Shows the cost of the tensor-parallel collectives on a small model where compute is cheap. Each tp size runs in
its own group of gloo processes (one thread each); the median of ``--steps`` timed steps after ``--warmup`` is
reported per rank, with and without sequence parallelism.

    python bench/bench_train_step.py [--hidden 512] [--layers 4] [--seq 128] [--batch 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def worker(rank: int, world: int, path: str, args: argparse.Namespace, sequence_parallel: bool) -> dict:
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.parallel import initialize_model_parallel

    if world > 1:
        initialize_model_parallel(tensor_model_parallel_size=world)
    model = AutoModelForCausalLM.from_pretrained(path, sequence_parallel=sequence_parallel)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        model.allreduce_sequence_parallel_gradients()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"rank": rank, "median_s": statistics.median(times), "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    import transformers

    from optimum_neuron_peft.parallel import spawn

    root = Path(tempfile.mkdtemp(prefix="bench_step_", dir="/tmp"))
    try:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(args.seq, 64),
        )  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(root, safe_serialization=True)
        params = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
        print(f"Llama {params / 1e6:.1f} M params (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
              f"batch {args.batch} x seq {args.seq}, fp32, gloo, 1 thread per rank")  # fmt: skip
        print(f"{'tp':>3} {'seq. parallel':>14} {'median step s (per rank)':>30} {'loss':>8}")
        for tp, sp in ((1, False), (2, False), (2, True)):
            rows = spawn(worker, tp, str(root), args, sp, timeout_s=900)
            steps = " ".join(f"{r['median_s']:.3f}" for r in rows)
            print(f"{tp:>3} {str(sp):>14} {steps:>30} {rows[0]['loss']:>8.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
