"""The examples run as documented: examples/train_lora.py under torchrun (2 gloo processes) and every shell example.

Launches cost 10-15 s each on 2 cores, so a module fixture trains once (8 steps, checkpoints at 4 and 8), resumes
once from a copy of its step-4 checkpoint, and lays its outputs out as the shell examples expect them
($WORK/base, $WORK/runs/count_up): the shell examples then reuse them and create only what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TRAIN_ARGS = ["--steps", "8", "--save-every", "4", "--log-every", "1", "--batch-size", "8", "--seq-len", "24",
              "--learning-rate", "3e-3", "--lora-r", "8", "--lora-alpha", "16", "--seed", "0"]  # fmt: skip
# The fixture's run also covers the fused qkv layer, sequence parallelism and LoRA dropout (whose RNG state the
# resumed run must restore to match).
FIXTURE_ARGS = [*TRAIN_ARGS, "--fuse-qkv", "--sequence-parallel", "--lora-dropout", "0.1", "--consolidate"]
RANK_FILES = "adapter/adapter_default/adapter_shards/model/tp_rank_{:02d}_pp_rank_00.safetensors"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun, optimum-neuron-peft
    return env


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")  # fmt: skip
    return proc


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                str(EXAMPLES / "train_lora.py"), *args])  # fmt: skip


def load_train_lora():
    spec = importlib.util.spec_from_file_location("train_lora_example", EXAMPLES / "train_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    from optimum_neuron_peft.demo.tiny_model import build_tiny_llama

    root = tmp_path_factory.mktemp("examples")
    base = build_tiny_llama(root / "base")
    run_dir = root / "runs" / "count_up"
    full = torchrun("--model-dir", str(base), "--output-dir", str(run_dir), *FIXTURE_ARGS)
    resumed_dir = root / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(run_dir / "checkpoint-4", resumed_dir / "checkpoint-4")  # as if the run had stopped after step 4
    resumed = torchrun("--model-dir", str(base), "--output-dir", str(resumed_dir), "--resume", *FIXTURE_ARGS)
    return SimpleNamespace(root=root, base=base, run=run_dir, full=full, resumed_dir=resumed_dir, resumed=resumed)


# -- train_lora.py --------------------------------------------------------------------------------------------


def test_train_lora_logs_a_falling_loss_and_saves_checkpoints(work):
    state = json.loads((work.run / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["tp_size"] == 2 and state["world_size"] == 2
    losses = state["losses"]
    assert len(losses) == 8
    assert losses[-1] < 0.85 * losses[0], losses
    logged = [line for line in work.full.stdout.splitlines() if line.startswith("step ")]
    assert len(logged) == 8 and logged[-1].startswith(f"step 8/8  loss {losses[-1]:.4f}")  # rank 0 only, each step
    for step in (4, 8):
        checkpoint = work.run / f"checkpoint-{step}"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
        assert (checkpoint / "adapter" / "manifest.json").is_file()
        for rank in (0, 1):
            assert (checkpoint / RANK_FILES.format(rank)).is_file()
            assert (checkpoint / "optimizer" / f"rank_{rank:05d}.pt").is_file()
    consolidated = sorted(p.name for p in (work.run / "consolidated").iterdir())
    assert consolidated == ["adapter_config.json", "adapter_model.safetensors"]


def test_resume_continues_from_the_checkpoint_and_equals_the_uninterrupted_run(work):
    out = work.resumed.stdout
    assert "(step 4)" in out and "step 4/8" not in out and "step 5/8" in out  # steps 1-4 are not redone
    full = json.loads((work.run / "checkpoint-8" / "trainer_state.json").read_text())
    resumed = json.loads((work.resumed_dir / "checkpoint-8" / "trainer_state.json").read_text())
    assert resumed["losses"] == full["losses"]
    for rank in (0, 1):  # every rank's shard and optimizer state, bit for bit
        a = load_file(work.run / "checkpoint-8" / RANK_FILES.format(rank))
        b = load_file(work.resumed_dir / "checkpoint-8" / RANK_FILES.format(rank))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
        opt_a = torch.load(work.run / "checkpoint-8" / "optimizer" / f"rank_{rank:05d}.pt", weights_only=True)
        opt_b = torch.load(work.resumed_dir / "checkpoint-8" / "optimizer" / f"rank_{rank:05d}.pt", weights_only=True)
        torch.testing.assert_close(opt_b["optimizer"], opt_a["optimizer"], rtol=0, atol=0)
    a = load_file(work.run / "consolidated" / "adapter_model.safetensors")
    b = load_file(work.resumed_dir / "consolidated" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and training did change the adapter (lora_B starts at zero)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)


def test_consolidated_adapter_loads_in_vanilla_peft(work):
    import peft
    import transformers

    from optimum_neuron_peft.demo.task import make_batch

    adapter = work.run / "consolidated"
    config = json.loads((adapter / "adapter_config.json").read_text())
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == projections  # the default: the 7 Llama projections
    saved = load_file(adapter / "adapter_model.safetensors")
    assert len(saved) == 2 * 7 * 2  # A and B, 7 projections, 2 layers

    # every saved tensor has its place in a vanilla PEFT model, and every LoRA parameter is saved
    fresh = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(work.base),
                                peft.LoraConfig.from_pretrained(str(adapter)))  # fmt: skip
    result = peft.set_peft_model_state_dict(fresh, saved)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]

    base = transformers.AutoModelForCausalLM.from_pretrained(work.base)
    batch = make_batch("count_up", 4, 24, base.config.vocab_size, torch.Generator().manual_seed(99))
    with torch.no_grad():
        base_loss = float(base(input_ids=batch, labels=batch).loss)
        model = peft.PeftModel.from_pretrained(base, adapter)
        loaded = peft.get_peft_model_state_dict(model)
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        adapted_loss = float(model(input_ids=batch, labels=batch).loss)
    assert adapted_loss < 0.9 * base_loss, (adapted_loss, base_loss)


def test_train_lora_user_errors(work, tmp_path):
    train_lora = load_train_lora()
    common = ["--model-dir", str(work.base), *TRAIN_ARGS]
    with pytest.raises(ValueError, match="already holds checkpoint-8; pass --resume"):
        train_lora.main(["--output-dir", str(work.run), *common])
    with pytest.raises(ValueError, match="--resume: no complete checkpoint"):
        train_lora.main(["--output-dir", str(tmp_path / "empty"), "--resume", *common])
    text = tmp_path / "corpus.txt"
    text.write_text("one two three\n")
    with pytest.raises(ValueError, match=r"has no tokenizer .* leave --data out"):
        train_lora.main(["--output-dir", str(tmp_path / "new"), "--data", str(text), *common])


def test_text_data_is_tokenized_and_windowed(tmp_path):
    """--data: the model directory's tokenizer, then random windows that are the same for the same seed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(10)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path / "model")
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(words * 3))
    train_lora = load_train_lora()
    ids = train_lora.tokenize_text_file(text, tmp_path / "model", vocab_size=64)
    assert ids.tolist() == list(range(10)) * 3
    first = next(train_lora.text_batches(ids, 4, 5, seed=1))
    assert first.shape == (4, 5) and all(((row - row[0]) % 10 == torch.arange(5)).all() for row in first)
    assert torch.equal(first, next(train_lora.text_batches(ids, 4, 5, seed=1)))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        train_lora.tokenize_text_file(text, tmp_path / "model", vocab_size=5)


# -- the shell examples ---------------------------------------------------------------------------------------

SHELL_OUTPUTS = {
    "consolidate": (["consolidated/count_up/adapter_model.safetensors", "consolidated/count_up/adapter_config.json",
                     "consolidated/count_up_bf16/adapter_model.bin"], "all equal to the file"),
    "verify": (["verify/count_up/adapter_model.safetensors"], "verify rejected the corrupted copy"),
    "reshard": (["reshard/count_up_tp4/" + RANK_FILES.format(3).removeprefix("adapter/"),
                 "reshard/base_tp4/shards/model/tp_rank_03_pp_rank_00.safetensors",
                 "reshard/count_up_from_tp4/adapter_model.safetensors"], "identical adapters"),
    "combine": (["runs/count_down/consolidated/adapter_model.safetensors", "combined/ties/adapter_model.safetensors",
                 "combined/cat/adapter_config.json"], "wrote"),
    "merge": (["merged/count_up/model.safetensors", "merged/count_up/config.json"], "merged model == base + adapter"),
}  # fmt: skip


@pytest.mark.parametrize("example", list(SHELL_OUTPUTS))
def test_shell_example(work, example):
    files, message = SHELL_OUTPUTS[example]
    proc = run(["bash", str(EXAMPLES / f"{example}.sh")], WORK=str(work.root), STEPS="8")
    assert message in proc.stdout
    missing = [f for f in files if not (work.root / f).is_file()]
    assert not missing, (missing, proc.stdout[-3000:])
    if example == "combine":
        assert json.loads((work.root / "combined/cat/adapter_config.json").read_text())["r"] == 16  # 8 + 8


@pytest.mark.slow
def test_end_to_end_from_nothing(tmp_path):
    proc = run(["bash", str(EXAMPLES / "end_to_end.sh")], timeout=600, WORK=str(tmp_path / "work"), STEPS="8")
    assert "all examples passed" in proc.stdout
    for files, _ in SHELL_OUTPUTS.values():
        for f in files:
            assert (tmp_path / "work" / f).is_file(), f


@pytest.mark.slow
def test_train_lora_data_parallel_on_a_text_file(work, tmp_path):
    """tp 1 x dp 2 on a plain-text file: each replica trains on its half of the batch; gradients are averaged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "model"
    shutil.copytree(work.base, model_dir)
    words = [f"w{i}" for i in range(64)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text(" ".join(words[2:34] * 20))  # counting up, as text
    out = tmp_path / "run"
    proc = torchrun("--model-dir", str(model_dir), "--output-dir", str(out), "--tp-size", "1",
                    "--data", str(tmp_path / "corpus.txt"), *TRAIN_ARGS)  # fmt: skip
    assert "tp 1 x dp 2" in proc.stdout
    losses = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["losses"]
    assert losses[-1] < 0.85 * losses[0], losses
    assert (out / "checkpoint-8" / "adapter" / "adapter_default" / "adapter_shards" / "model"
            / "tp_rank_00_pp_rank_00.safetensors").is_file()  # fmt: skip
