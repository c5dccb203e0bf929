"""SFTTrainer trains like TRL's SFTTrainer (same prepared data, same losses and adapter, tp 1, one process), and
SFTConfig carries TRL's SFT fields with TRL's defaults except the documented differences."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import peft
import pytest
import torch
import transformers
import trl

from optimum_neuron_peft.demo.chat_tokenizer import build_chat_tokenizer, message_texts
from optimum_neuron_peft.demo.tiny_model import TinyModelSpec, build_tiny_llama
from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.training import SFTConfig, SFTTrainer, TrainingArguments
from optimum_neuron_peft.training.sft import UNSUPPORTED_TRL_FIELDS

CHAT = Path(__file__).resolve().parents[2] / "examples" / "data" / "chat.jsonl"
CONVERSATIONS = [json.loads(line) for line in CHAT.read_text(encoding="utf-8").splitlines()]
# packing "wrapped" to 32 tokens gives full rows, then one short one; 4 optimizer steps of 2 x 2 rows
ARGS = dict(max_length=32, packing=True, assistant_only_loss=True, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, lr_scheduler_type="linear",
            warmup_steps=1, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
            disable_tqdm=True, max_grad_norm=0.5)  # fmt: skip
LOG_KEYS = ("loss", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tokenizer = build_chat_tokenizer(message_texts(CONVERSATIONS), root / "base")
    base = build_tiny_llama(root / "base", TinyModelSpec(vocab_size=len(tokenizer), hidden_size=32,
                                                         intermediate_size=64))  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                             init_lora_weights=False)  # fmt: skip
    peft.get_peft_model(model, config).save_pretrained(str(root / "adapter"))
    return root, base, tokenizer


def _logs(trainer) -> list[dict]:
    return [{k: e[k] for k in LOG_KEYS} for e in trainer.state.log_history if "loss" in e]


def test_sft_trainer_trains_like_trl(setup):
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
    from optimum_neuron_peft.peft import PeftModel

    root, base, tokenizer = setup
    data = datasets.Dataset.from_list(CONVERSATIONS[:40])

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref_model = peft.PeftModel.from_pretrained(ref_model, str(root / "adapter"), is_trainable=True)
    ref_args = trl.SFTConfig(output_dir=str(root / "trl"), bf16=False, gradient_checkpointing=False,
                             packing_strategy="wrapped", **ARGS)  # fmt: skip
    ref = trl.SFTTrainer(model=ref_model, args=ref_args, train_dataset=data, processing_class=tokenizer)
    ref.train()

    initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        model = PeftModel.from_pretrained(model, root / "adapter", is_trainable=True)
        ours = SFTTrainer(model=model, args=SFTConfig(output_dir=str(root / "ours"), **ARGS), train_dataset=data,
                          processing_class=tokenizer)  # fmt: skip
        assert ours.train_dataset["input_ids"] == ref.train_dataset["input_ids"]
        assert ours.train_dataset["labels"] == ref.train_dataset["labels"]
        shapes = {tuple(b["input_ids"].shape) for b in ours.get_train_dataloader()}
        assert shapes == {(2, 32)}
        ours.train()
        ours.save_model(str(root / "ours" / "final"))
    finally:
        destroy_model_parallel()
    ref.save_model(str(root / "trl" / "final"))
    got, want = _logs(ours), _logs(ref)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        for k in LOG_KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-4), (k, got, want)
    from safetensors.torch import load_file

    ours_adapter = load_file(str(root / "ours" / "final" / "adapter_model.safetensors"))
    ref_adapter = load_file(str(root / "trl" / "final" / "adapter_model.safetensors"))
    assert ours_adapter.keys() == ref_adapter.keys()
    for k in ref_adapter:
        torch.testing.assert_close(ours_adapter[k], ref_adapter[k], rtol=1e-4, atol=1e-6)


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
