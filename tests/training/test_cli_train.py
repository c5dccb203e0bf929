"""``optimum-neuron-peft train CONFIG.yaml --nproc 2``: starts the processes itself, trains at tp 2 (SFT, packing)
and writes the consolidated adapter, which vanilla PEFT loads and which equals the last sharded checkpoint's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from optimum_neuron_peft.checkpoint import consolidate

REPO = Path(__file__).resolve().parents[2]
CHAT = REPO / "examples" / "data" / "chat.jsonl"
pytestmark = pytest.mark.distributed


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "optimum_neuron_peft", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from optimum_neuron_peft.demo.chat_tokenizer import build_chat_tokenizer, message_texts
    from optimum_neuron_peft.demo.tiny_model import TinyModelSpec, build_tiny_llama

    work = Path(tmp_path_factory.mktemp("cli_train"))
    lines = CHAT.read_text(encoding="utf-8").splitlines()[:32]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_chat_tokenizer(message_texts([json.loads(line) for line in lines]), work / "base")
    build_tiny_llama(work / "base", TinyModelSpec(vocab_size=64))  # divisible by tp
    (work / "cfg.yaml").write_text(
        "model: base\ntrain_file: train.jsonl\n"
        "lora: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj, down_proj]}\n"
        "training: {output_dir: run, tensor_parallel_size: 2, max_steps: 4, per_device_train_batch_size: 2,\n"
        "           max_length: 32, packing: true, logging_steps: 1, save_steps: 2, learning_rate: 0.001,\n"
        "           report_to: none, use_cpu: true}\n"
    )
    return work


def test_train_writes_the_consolidated_adapter(workdir):
    proc = cli("train", "cfg.yaml", "--nproc", "2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote the consolidated PEFT adapter to run/adapter" in proc.stdout
    # logs and the progress bar come from the first rank only
    assert proc.stdout.count("'loss'") == 4
    assert proc.stderr.count(" 0/4 [") == 1
    adapter, run = workdir / "run" / "adapter", workdir / "run"
    # vanilla PEFT loads it on the Transformers model
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(model, str(adapter))
    assert loaded.peft_config["default"].r == 4
    # it is the trained adapter of the last step: the consolidation of the step-4 sharded checkpoint
    consolidate(run / "checkpoint-4" / "adapter", workdir / "from_checkpoint")
    final, expected = load_file(str(adapter / "adapter_model.safetensors")), load_file(
        str(workdir / "from_checkpoint" / "adapter_model.safetensors"))  # fmt: skip
    assert sorted(final) == sorted(expected) and len(final) == 2 * 2 * 3
    for name in final:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=0, msg=name)
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert json.loads((run / "training_summary.json").read_text())["world_size"] == 2


def test_bad_input_is_one_line_and_writes_nothing(workdir):
    proc = cli("train", "cfg.yaml", "--nproc", "2", "--train-file", "missing.jsonl", "--output-dir", "run2",
               cwd=workdir)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: cfg.yaml: train_file 'missing.jsonl': no such file"]
    assert not (workdir / "run2").exists()
