"""Benchmark: streaming consolidation vs the `cp -r` floor vs a whole-in-memory baseline.

Builds synthetic Llama-shaped checkpoints (GQA, bf16, tp=8 by default) in our sharded format and in
optimum-neuron's plain format, then measures, each in its own child process (peak RSS from GNU time), in rounds
that alternate the cases (median of the rounds reported):

- ``cp -r`` of the rank files + fsync of the copies (the floor: consolidation fsyncs its output too);
- ``optimum-neuron-peft consolidate`` of our format and of optimum-neuron's plain format, as a user runs it: both
  are full-model checkpoints, so the torch-free engine takes them (checked once, untimed, with
  ``--engine torch-free``, which fails rather than fall back);
- the same command with ``--engine torch`` on our format: the torch engine, for comparison;
- ``--verify`` with both engines on our format (the torch-free one compares bytes, the torch one re-derives the shards);
- the whole-in-memory baseline: ``torch.load`` every rank, gather every tensor, save the shards (what
  optimum-neuron's consolidation does);
- the same plain command with an empty key cache (Llama's expected keys are derived from config.json, no cache);
- the fixed start-up costs inside those figures: the interpreter + the imports of the torch-free CLI path, and
  ``python -c "import optimum_neuron_peft.checkpoint.torch_engine"`` (the torch engine: interpreter + torch).

All inputs are in the page cache (written just before; nothing is dropped), for every measurement alike. On a
shared machine, run it alone (``flock /tmp/cpu.lock python bench/...``).

    python bench/bench_consolidate.py --sizes-gb 1.5 3 --tp 8 --rounds 3 --workdir /tmp/bench_consolidate
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from optimum_neuron_peft.checkpoint.optimum_neuron import metadata_file_name, rank_file_name
from optimum_neuron_peft.checkpoint.native_format import (
    common_dtype,
    metadata_path,
    rank_file_path,
    write_json,
    write_manifest,
    write_rank_file,
)
from optimum_neuron_peft.checkpoint.tp_layout import plan_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "checkpoint"))  # the test fixtures' writer
from optimum_neuron_writer import write_metadata  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def config_for(size_gb: float) -> dict:
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV_HEADS // HEADS + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    layers = max(1, math.ceil((size_gb * 1e9 - fixed) / per_layer))
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_hidden_layers=layers, vocab_size=VOCAB,
        max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="bfloat16", rms_norm_eps=1e-5,
    )  # fmt: skip


def original_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def build(root: Path, config: dict, tp: int) -> tuple[int, int]:
    """Write ``root/ours`` and ``root/on`` (plain); returns (bytes, largest group bytes)."""
    layout = plan_layout(config, tp)
    gen = torch.Generator().manual_seed(0)
    # Random bits (any bf16 value, NaNs included: the data is only moved). Sharded from one original model so that
    # the replicated key/value heads agree across ranks, as in a real checkpoint (`--verify` checks it).
    meta = {
        n: torch.randint(-(2**15), 2**15 - 1, s, dtype=torch.int16, generator=gen).view(torch.bfloat16)
        for n, s in original_shapes(config).items()
    }
    ours, on = root / "ours", root / "on"
    records, total = {}, 0
    for tp_rank in range(tp):
        local = layout.shard(meta, tp_rank)
        path = rank_file_path(ours, tp_rank, 0)
        records[path.relative_to(ours).as_posix()] = write_rank_file(path, local)
        on_path = on / "shards" / "model" / rank_file_name(tp_rank, 0)
        on_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(local, on_path)
        total += sum(t.nbytes for t in local.values())
        del local
    metadata = layout.metadata(0)
    records[metadata_path(ours, 0).relative_to(ours).as_posix()] = write_json(metadata_path(ours, 0), metadata)
    write_metadata(on / "shards" / metadata_file_name(0), metadata)
    for directory in (ours, on):
        (directory / "config.json").write_text(json.dumps(config))
    records["config.json"] = write_json(ours / "config.json", config)
    write_manifest(ours, records, tp_size=tp, pp_size=1, dtype=common_dtype({torch.bfloat16}), has_model=True)
    del meta
    meta = original_shapes(config)
    groups = [sum(math.prod(meta[n]) * 2 for n in g.get_relevant_parameter_names() if n in meta) for g in layout.specs]
    largest = max(groups + [math.prod(s) * 2 for s in meta.values()])
    return total, largest


BASELINE = r"""
import sys, torch
from pathlib import Path
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from optimum_neuron_peft.checkpoint.optimum_neuron import load_metadata
from optimum_neuron_peft.transformations import parse_metadata, to_original_weights
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
files = sorted((src / "shards" / "model").glob("*.pt"))
ranks = [torch.load(f, weights_only=True) for f in files]          # every rank in memory
parameters, specs = parse_metadata(load_metadata(src / "shards" / "mp_metadata_pp_rank_0.json"))
sharded = {n: [r[n] for r in ranks] for n in ranks[0]}
full = to_original_weights(specs, sharded, parameters)              # the whole model in memory
del sharded, ranks
split = split_torch_state_dict_into_shards(full, filename_pattern="model{suffix}.safetensors")
for file, names in split.filename_to_tensors.items():
    save_file({n: full[n].contiguous() for n in names}, out / file, metadata={"format": "pt"})
"""


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command, measured by GNU time (%M: max RSS of the command).

    Not ``os.wait4`` on our own child: a child forked from this (large) process starts with its RSS high-water mark.
    """
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr[-2000:]}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) * 1024


def measure(root: Path, rounds: int, skip_baseline: bool = False) -> dict:
    py = sys.executable
    consolidate = [py, "-m", "optimum_neuron_peft", "consolidate"]
    for source in ("ours", "on"):  # the timed runs below must not be torch-engine fallbacks
        out = root / "out"
        subprocess.run([*consolidate, str(root / source), str(out), "--no-progress", "--engine", "torch-free"], check=True, capture_output=True)
        shutil.rmtree(out)
    cases = {
        "cp -r + fsync (floor)": lambda out: ["sh", "-c", f"cp -r {root / 'ours' / 'shards'} {out} && find {out} -type f -exec sync {{}} +"],
        "consolidate (ours)": lambda out: [*consolidate, str(root / "ours"), str(out), "--no-progress"],
        "consolidate (optimum-neuron plain)": lambda out: [*consolidate, str(root / "on"), str(out), "--no-progress"],
        # A fresh, empty cache each run: Llama's expected keys are derived from config.json (`known_keys`), so no
        # child process imports torch + transformers; this row shows the cache plays no part.
        "consolidate (ours), empty key cache": lambda out: [
            "sh", "-c", 'XDG_CACHE_HOME="$(mktemp -d)" exec "$@"', "sh", *consolidate, str(root / "ours"), str(out), "--no-progress"
        ],
        "consolidate --engine torch (ours)": lambda out: [*consolidate, str(root / "ours"), str(out), "--no-progress", "--engine", "torch"],
        # --verify: the torch-free engine re-reads the output and compares it with the rank-file bytes (`byte_verify`);
        # the torch engine re-derives every rank's shards with torch.
        "consolidate --verify (ours)": lambda out: [*consolidate, str(root / "ours"), str(out), "--no-progress", "--verify"],
        "consolidate --verify --engine torch (ours)": lambda out: [
            *consolidate, str(root / "ours"), str(out), "--no-progress", "--verify", "--engine", "torch"
        ],
        "whole-in-memory baseline": lambda out: [py, "-c", BASELINE, str(root / "on"), str(out)],
        # The fixed costs inside the consolidate figures above: interpreter start + imports.
        "python + imports, torch-free CLI path": lambda out: [py, "-c", "import optimum_neuron_peft.cli.consolidate, optimum_neuron_peft.checkpoint.consolidate, optimum_neuron_peft.checkpoint.torch_free"],
        "python + imports, torch engine": lambda out: [py, "-c", "import optimum_neuron_peft.checkpoint.torch_engine"],
    }
    if skip_baseline:
        del cases["whole-in-memory baseline"]
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in cases}
    # Rounds alternate the cases (floor, ours, ..., floor, ours, ...): a slow phase of the shared host hits every case
    # of a round alike, instead of all the runs of one case.
    for round_ in range(rounds):
        for name, cmd in cases.items():
            out = root / "out"
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(run_measured(cmd(out)))
            shutil.rmtree(out, ignore_errors=True)
        floor = runs["cp -r + fsync (floor)"][-1][0]
        print(f"  round {round_ + 1}: " + ", ".join(f"{n} {r[-1][0]:.2f} s ({r[-1][0] / floor:.2f}x)" for n, r in runs.items()), flush=True)
    results = {}
    for name, measured in runs.items():
        seconds = sorted(r[0] for r in measured)
        results[name] = {"seconds": statistics.median(seconds), "all_seconds": [r[0] for r in measured],
                         "peak_rss": max(r[1] for r in measured)}  # fmt: skip
        print(f"  {name}: median {results[name]['seconds']:.2f} s, peak RSS {results[name]['peak_rss'] / 2**20:.0f} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.5, 3.0])
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the (slow) whole-in-memory baseline")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_consolidate"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM", "runs": []}  # fmt: skip
    for size in args.sizes_gb:
        root = args.workdir / f"{size:g}GB"
        shutil.rmtree(root, ignore_errors=True)
        config = config_for(size)
        start = time.perf_counter()
        nbytes, largest = build(root, config, args.tp)
        print(f"{size:g} GB target: {config['num_hidden_layers']} layers, {nbytes / 1e9:.2f} GB at tp={args.tp}, "
              f"largest group {largest / 2**20:.0f} MiB (built in {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        try:
            figures = measure(root, args.rounds, args.skip_baseline)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        report["runs"].append({"size_bytes": nbytes, "layers": config["num_hidden_layers"], "largest_group_bytes": largest,
                               "tp": args.tp, "results": figures})  # fmt: skip
    print("\n| model | tp | measurement | time (s) | GB/s | x floor | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        floor = run["results"]["cp -r + fsync (floor)"]["seconds"]
        for name, r in run["results"].items():
            print(f"| {run['size_bytes'] / 1e9:.2f} GB, {run['layers']} layers | {run['tp']} | {name} | {r['seconds']:.2f} | "
                  f"{run['size_bytes'] / r['seconds'] / 1e9:.2f} | {r['seconds'] / floor:.2f} | {r['peak_rss'] / 2**20:.0f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
