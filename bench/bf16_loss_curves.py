"""bf16 vs fp32 LoRA training on the demo task: loss curves side by side, and the PNG in docs/.

Trains the demo's "count up" adapter at tp = 2 (2 gloo processes) twice from the same seed and data: once on an
fp32 base, once under the bf16 policy (bf16 base weights and activations, fp32 LoRA parameters, fp32 AdamW state,
parameter gradients reduced in fp32). Prints the two curves' agreement and writes the plot.

    python bench/bf16_loss_curves.py --steps 150 --out docs/bf16_vs_fp32_loss.png
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from optimum_neuron_peft.demo.tiny_model import build_tiny_llama
from optimum_neuron_peft.demo.train import TrainSettings, demo_worker
from optimum_neuron_peft.parallel import spawn


def curves(steps: int, tp: int) -> dict[str, list[float]]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_llama(Path(tmp) / "base")
        for dtype in ("float32", "bfloat16"):
            settings = replace(TrainSettings(steps=steps), dtype=dtype)
            print(f"training {steps} steps at tp={tp}, base in {dtype} ...", flush=True)
            results = spawn(demo_worker, tp, str(base), str(Path(tmp) / dtype), ["count_up"], settings, timeout_s=1800)
            out[dtype] = results[0][0].losses
    return out


def plot(losses: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32, bf16 = torch.tensor(losses["float32"]), torch.tensor(losses["bfloat16"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=110, sharex=True, height_ratios=[2, 1])
    steps = range(1, len(fp32) + 1)
    top.plot(steps, fp32, label="fp32 base", linewidth=1.4)
    top.plot(steps, bf16, label="bf16 base, fp32 LoRA + AdamW state", linewidth=1.2, linestyle="--")
    top.set_yscale("log")
    top.set_ylabel("loss (nats)")
    top.set_title("LoRA on the demo task (count_up), tp=2: bf16 policy vs fp32")
    top.grid(True, which="both", alpha=0.3)
    top.legend()
    bottom.plot(steps, (bf16 - fp32).abs() / fp32, color="C3", linewidth=1.0)
    bottom.set_yscale("log")
    bottom.set_ylabel("|bf16 - fp32| / fp32")
    bottom.set_xlabel("step")
    bottom.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/bf16_vs_fp32_loss.png"))
    args = parser.parse_args()
    losses = curves(args.steps, args.tp)
    fp32, bf16 = torch.tensor(losses["float32"]), torch.tensor(losses["bfloat16"])
    rel = (bf16 - fp32).abs() / fp32
    print(f"{'step':>6} {'fp32':>10} {'bf16':>10} {'rel diff':>9}")
    for i in sorted({0, 9, 24, 49, 99, len(fp32) - 1} & set(range(len(fp32)))):
        print(f"{i + 1:>6} {fp32[i].item():>10.5f} {bf16[i].item():>10.5f} {rel[i].item():>9.4f}")
    print(f"max relative difference: {rel.max().item():.4f} (step {int(rel.argmax()) + 1}); "
          f"mean {rel.mean().item():.4f}; last-10 mean fp32 {fp32[-10:].mean().item():.5f}, bf16 {bf16[-10:].mean().item():.5f}")
    plot(losses, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
