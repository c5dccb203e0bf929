"""examples/sft_lora.py runs as documented: 2 gloo processes (tp 2), packed chat SFT, consolidation, a chat reply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def test_sft_example_trains_consolidates_and_chats(tmp_path):
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "examples" / "sft_lora.py"), "--output-dir", str(out), "--steps", "6", "--max-length", "32",
           "--batch-size", "2", "--learning-rate", "1e-2", "--max-new-tokens", "4"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tensor_parallel_size"] == 2 and summary["steps"] == 6
    assert summary["batch_shapes"] == [[2, 32]]  # every tensor of every batch: (batch, max_length)
    losses = summary["losses"]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0]
    assert isinstance(summary["reply"], str) and f"assistant: {summary['reply']}" in proc.stdout
    # The checkpoint consolidated by the CLI's engine and the trainer's save_model are the same vanilla adapter
    consolidated = load_file(str(out / "consolidated" / "adapter_model.safetensors"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert consolidated.keys() == saved.keys() and len(saved) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name, tensor in saved.items():
        torch.testing.assert_close(consolidated[name], tensor, rtol=0, atol=0)
