"""The demo, end to end: everything a user does with the library, on a tiny model, in a couple of minutes.

1. build a tiny random Llama (GQA with fewer key/value heads than tp) as a Transformers directory;
2. train two LoRA adapters ("count up", "count down") with tensor parallelism over 2 gloo processes;
3. save sharded adapter checkpoints, consolidate them into vanilla PEFT adapters;
4. load them with vanilla Transformers + PEFT and compare the logits with the tensor-parallel model;
5. combine the two adapters with TIES, merge one into the base weights and check the merged model;
6. print a summary table and write a loss-curve PNG.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils.atomic import check_output_dir
from .plot import plot_loss_curves
from .task import TASKS
from .tiny_model import TinyModelSpec, build_tiny_llama
from .train import TrainSettings, demo_worker, eval_batch


@dataclass
class DemoReport:
    rows: list[tuple[str, str]]
    plot: Path | None
    max_logits_diff: float
    merged_logits_diff: float

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows)
        lines = [f"{'what'.ljust(width)}  value", f"{'-' * width}  {'-' * 30}"]
        lines += [f"{k.ljust(width)}  {v}" for k, v in self.rows]
        return "\n".join(lines)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _vanilla_logits(base_dir: Path, adapter_dir: Path | None, input_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _task_loss(base_dir: Path, adapter_dir: Path, task: str, vocab: int) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    batch = eval_batch(vocab, task)
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


def run_demo(output_dir: str | Path, *, steps: int = 300, tp_size: int = 2, overwrite: bool = False,
             log=print) -> DemoReport:  # fmt: skip
    from ..checkpoint.consolidate import consolidate
    from ..merging import combine_adapters, merge_adapter_into_base
    from ..parallel import spawn

    output_dir = check_output_dir(output_dir, overwrite)  # a non-empty directory is replaced only with overwrite
    if output_dir.exists() and any(output_dir.iterdir()):
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(TASKS)
    settings = TrainSettings(steps=steps)
    spec = TinyModelSpec()

    log(f"[1/5] building a tiny Llama ({spec.num_attention_heads} heads, {spec.num_key_value_heads} kv head, "
        f"{spec.num_hidden_layers} layers, vocab {spec.vocab_size}) in {output_dir / 'base'}")
    base_dir = build_tiny_llama(output_dir / "base", spec)

    log(f"[2/5] training {len(tasks)} LoRA adapters for {steps} steps each, tensor parallel over {tp_size} "
        "gloo processes")
    checkpoints = output_dir / "checkpoints"
    t0 = time.perf_counter()
    per_rank = spawn(demo_worker, tp_size, str(base_dir), str(checkpoints), tasks, settings, timeout_s=900)
    train_seconds = time.perf_counter() - t0
    results = per_rank[0]

    log("[3/5] consolidating the sharded checkpoints into vanilla PEFT adapters")
    adapters: dict[str, Path] = {}
    consolidation_seconds = 0.0
    for task in tasks:
        consolidated = consolidate(checkpoints / task, output_dir / "adapters" / task, overwrite=True)
        consolidation_seconds += consolidated.seconds
        adapters[task] = consolidated.output_dir

    log("[4/5] loading them with vanilla Transformers + PEFT and comparing logits")
    diffs = []
    for result in results:
        vanilla = _vanilla_logits(base_dir, adapters[result.task], eval_batch(spec.vocab_size, result.task))
        diffs.append(float((vanilla - result.eval_logits).abs().max()))
    max_diff = max(diffs)

    log("[5/5] combining the adapters with TIES and merging 'count_up' into the base weights")
    t0 = time.perf_counter()
    combine_adapters([adapters[t] for t in tasks], [1.0, 1.0], "ties", density=0.5,
                     output_dir=output_dir / "adapters" / "ties", overwrite=True)  # fmt: skip
    ties_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged_dir = merge_adapter_into_base(base_dir, adapters["count_up"], output_dir / "merged_count_up", overwrite=True)
    merge_seconds = time.perf_counter() - t0
    probe = eval_batch(spec.vocab_size, "count_up")
    merged_diff = float((_vanilla_logits(merged_dir, None, probe) - _vanilla_logits(base_dir, adapters["count_up"], probe)).abs().max())

    curves = {f"{r.task} (tp={tp_size})": r.losses for r in results}
    plot = plot_loss_curves(curves, output_dir / "loss_curve.png", "LoRA on a tiny Llama, tensor parallel")
    rows = [("tensor parallel size", f"{tp_size} (gloo), kv heads replicated x{tp_size // spec.num_key_value_heads}")]
    for r in results:
        rows.append((f"{r.task}: steps, loss first -> last", f"{len(r.losses)}, {r.losses[0]:.3f} -> {r.losses[-1]:.4f}"))
    rows += [
        ("training wall time (incl. process start)", f"{train_seconds:.1f} s"),
        ("sharded checkpoint sizes", ", ".join(f"{t}: {_dir_size(checkpoints / t) / 1024:.0f} KiB" for t in tasks)),
        ("consolidation time (both adapters)", f"{consolidation_seconds:.3f} s"),
        ("logits max |TP - vanilla PEFT|", f"{max_diff:.2e}"),
        ("TIES combination (density 0.5)", f"{ties_seconds:.2f} s, eval loss count_up "
         f"{_task_loss(base_dir, output_dir / 'adapters' / 'ties', 'count_up', spec.vocab_size):.3f}, count_down "
         f"{_task_loss(base_dir, output_dir / 'adapters' / 'ties', 'count_down', spec.vocab_size):.3f}"),
        ("merge count_up into base", f"{merge_seconds:.2f} s, logits max |merged - PEFT| {merged_diff:.2e}"),
        ("loss curve", str(plot) if plot else "(matplotlib not installed)"),
        ("outputs", str(output_dir)),
    ]
    return DemoReport(rows, plot, max_diff, merged_diff)
