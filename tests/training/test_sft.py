"""SFTTrainer trains like TRL's SFTTrainer on the Transformers model with vanilla PEFT (same prepared rows, same
losses, gradient norms, learning rates and adapter, rtol 1e-4) at tp 1 and at tp 2 with sequence parallelism; and
SFTConfig carries TRL's SFT fields with TRL's defaults except the documented differences."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
import trl
from safetensors.torch import load_file
from sft_cases import LOG_KEYS, make_setup, our_run, tp_worker, trl_run

from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.parallel import spawn
from optimum_neuron_peft.training import SFTConfig, TrainingArguments
from optimum_neuron_peft.training.sft import UNSUPPORTED_TRL_FIELDS, as_sft_config

RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = Path(tmp_path_factory.mktemp("sft"))
    make_setup(root)
    return root


@pytest.fixture(scope="module")
def reference(root):
    return trl_run(root)


def _assert_same(got_logs, got_dir: Path, ref_logs, ref_dir: Path):
    assert len(got_logs) == len(ref_logs) == 5  # 4 steps, then evaluate()
    assert got_logs[-1]["eval_loss"] == pytest.approx(ref_logs[-1]["eval_loss"], rel=RTOL)
    for step, (g, w) in enumerate(zip(got_logs[:-1], ref_logs[:-1]), start=1):
        for k in LOG_KEYS:
            assert g[k] == pytest.approx(w[k], rel=RTOL, abs=ATOL), f"step {step} {k}: {g[k]} != {w[k]}"
    got, want = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (got_dir, ref_dir))
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)


def test_reference_trains(root, reference):
    """The comparison proves something: the loss falls, clipping acts, the adapter moves."""
    ref_logs, _ = reference
    train = ref_logs[:-1]
    assert train[-1]["loss"] < train[0]["loss"] and all(e["grad_norm"] > 0.5 for e in train)
    start = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    end = load_file(str(root / "trl" / "final" / "adapter_model.safetensors"))
    assert max((end[k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_tp1_equals_trl_sft_trainer(root, reference):
    ref_logs, ref = reference
    got_logs, ours, shapes = our_run(root, "tp1", tp=1)
    assert ours.train_dataset["input_ids"] == ref.train_dataset["input_ids"]
    assert ours.train_dataset["labels"] == ref.train_dataset["labels"]
    assert shapes == {(2, 32), ("eval", 3, 32)}  # the last eval batch is short: completed by filler rows
    _assert_same(got_logs, root / "tp1", ref_logs, root / "trl")


@pytest.mark.distributed
def test_tp2_sequence_parallel_equals_trl_sft_trainer(root, reference):
    ref_logs, _ = reference
    got_logs, shapes = spawn(tp_worker, 2, str(root), 2, timeout_s=600)[0]
    assert shapes == {(2, 32), ("eval", 3, 32)}
    _assert_same(got_logs, root / "tp2", ref_logs, root / "trl")


def test_sft_config_fields_match_trl():
    ours = {f.name: f for f in dataclasses.fields(SFTConfig)}
    theirs = {f.name: f for f in dataclasses.fields(trl.SFTConfig)}
    assert set(theirs) - set(ours) == set(UNSUPPORTED_TRL_FIELDS)
    assert set(ours) - set(theirs) == {f.name for f in dataclasses.fields(TrainingArguments)} - {
        f.name for f in dataclasses.fields(transformers.TrainingArguments)}  # fmt: skip
    differ = {k for k in set(ours) & set(theirs) if ours[k].default != theirs[k].default}
    # documented in optimum_neuron_peft/training/sft.py: fp32 and no checkpointing by default, no padding-free bfd
    assert differ == {"bf16", "gradient_checkpointing", "packing_strategy"}


def test_sft_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="SFTConfig.max_length: expected a positive int"):
        SFTConfig(output_dir=str(tmp_path), max_length=None)
    with pytest.raises(ConfigError, match="SFTConfig.packing_strategy"):
        SFTConfig(output_dir=str(tmp_path), packing_strategy="padding_free")
    with pytest.raises(ConfigError, match="dataset_kwargs"):
        SFTConfig(output_dir=str(tmp_path), dataset_kwargs={"skip": True})


def test_training_arguments_become_an_sft_config(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), tensor_parallel_size=2, learning_rate=0.125, use_cpu=True,
                             lr_scheduler_type="cosine", report_to="none", logging_steps=3)  # fmt: skip
    config = as_sft_config(args)
    assert isinstance(config, SFTConfig) and as_sft_config(config) is config
    assert (config.tensor_parallel_size, config.learning_rate, config.lr_scheduler_type, config.logging_steps) == (
        2, 0.125, args.lr_scheduler_type, 3)  # fmt: skip
    assert (config.max_length, config.packing, config.packing_strategy) == (1024, False, "wrapped")
    with pytest.raises(TypeError, match="SFTTrainer: args must be optimum_neuron_peft.training.SFTConfig"):
        as_sft_config(transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
