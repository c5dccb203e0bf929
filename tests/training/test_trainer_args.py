"""The Trainer's arguments and user errors (one process, tp 1): layout taken from the model, contradictions and
unsupported options refused with one clear error, and ``load_best_model_at_end`` reading our checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from training_cases import common_args, dataset, eval_dataset, make_adapter, make_base

from optimum_neuron_peft.checkpoint import consolidate
from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.models import AutoModelForCausalLM
from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
from optimum_neuron_peft.peft import PeftModel
from optimum_neuron_peft.training import Trainer, TrainingArguments


@pytest.fixture
def model(tmp_path):
    initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        base = AutoModelForCausalLM.from_pretrained(make_base(tmp_path), torch_dtype=torch.float32, fuse_qkv=True)
        yield PeftModel.from_pretrained(base, make_adapter(tmp_path), is_trainable=True)
    finally:
        destroy_model_parallel()


def test_layout_is_taken_from_the_model(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **common_args())
    Trainer(model=model, args=args, train_dataset=dataset())
    assert (args.tensor_parallel_size, args.sequence_parallel, args.fuse_qkv, args.kv_size_multiplier) == (
        1, False, True, 1)  # fmt: skip
    assert (args.world_size, args.dp_size, args.process_index) == (1, 1, 0)


@pytest.mark.parametrize("field,value", [("fuse_qkv", False), ("sequence_parallel", True)])
def test_a_contradiction_with_the_model_is_an_error(model, tmp_path, field, value):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **{field: value}, **common_args())
    with pytest.raises(ConfigError, match=rf"TrainingArguments\.{field}={value}, but the model was built with"):
        Trainer(model=model, args=args, train_dataset=dataset())


def test_transformers_arguments_are_refused(model, tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="optimum_neuron_peft.training.TrainingArguments"):
        Trainer(model=model, args=args, train_dataset=dataset())


def test_gradient_checkpointing_needs_the_model_method(model, tmp_path):
    if hasattr(model.base_model.model, "gradient_checkpointing_enable"):
        pytest.skip("the model supports gradient checkpointing")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), gradient_checkpointing=True, **common_args())
    with pytest.raises(ConfigError, match="gradient_checkpointing_enable"):
        Trainer(model=model, args=args, train_dataset=dataset())


@pytest.mark.parametrize("field,value,message", [
    ("tensor_parallel_size", 0, "tensor_parallel_size must be an int >= 1, got 0"),
    ("kv_size_multiplier", -1, "kv_size_multiplier must be an int >= 1, got -1"),
    ("hardware", "trn3", "hardware must be 'trn1' or 'trn2'"),
    ("peak_flops_per_device", 0.0, "peak_flops_per_device must be a positive number, got 0.0"),
])  # fmt: skip
def test_bad_values_are_refused(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainingArguments(output_dir=str(tmp_path / "out"), **{field: value})


def test_load_best_model_at_end_reads_our_checkpoint(model, tmp_path):
    """Evaluate and save every step, keep the best by eval_loss: at the end the model holds that checkpoint's
    adapter (consolidated from our sharded format), not the last step's."""
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), **common_args(
        save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", learning_rate=0.5, max_grad_norm=1.0))  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=eval_dataset(),
                      data_collator=transformers.default_data_collator)  # fmt: skip
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == out and best.name.startswith("checkpoint-")
    consolidate(best / "adapter", tmp_path / "best")
    expected = {k.removeprefix("base_model.model."): v
                for k, v in load_file(str(tmp_path / "best" / "adapter_model.safetensors")).items()}  # fmt: skip
    got = model.consolidated_adapter_state_dict()
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_without_adapter_save_model_writes_a_transformers_directory(tmp_path):
    """Full fine-tuning of our model: save_model writes a Transformers model directory holding the trained weights."""
    initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(make_base(tmp_path), torch_dtype=torch.float32)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), **common_args(max_steps=2, learning_rate=1e-2))
        trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                          data_collator=transformers.default_data_collator)  # fmt: skip
        trainer.train()
        trainer.save_model(str(tmp_path / "saved"))
        saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
        original = transformers.AutoModelForCausalLM.from_pretrained(make_base(tmp_path), dtype=torch.float32)
        ours = dict(model.named_parameters())
        moved = False
        for name, param in saved.named_parameters():
            if name in ours:  # q/k/v and gate/up are fused in ours under other names
                torch.testing.assert_close(param, ours[name].detach(), rtol=0, atol=0, msg=name)
            moved |= not torch.equal(param, dict(original.named_parameters())[name])
        assert moved, "the saved model is the untrained one"
    finally:
        destroy_model_parallel()


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    """The save of checkpoint-3 fails after its adapter is written (a crash mid-save): no checkpoint-3 appears,
    checkpoint-2 is intact, and resume_from_checkpoint=True continues from it to the uninterrupted result."""
    import training_cases
    from training_cases import our_run

    from optimum_neuron_peft.training import trainer as trainer_module

    checkpoints = dict(save_strategy="steps", save_steps=1)
    uninterrupted = our_run(tmp_path, tmp_path / "uninterrupted", tp=1, **checkpoints)

    real_save = trainer_module.save_optimizer_state

    def crash_at_step_3(directory, tensors, rest):
        if ".checkpoint-3." in str(directory):
            raise KeyboardInterrupt("killed during the save")
        real_save(directory, tensors, rest)

    monkeypatch.setattr(trainer_module, "save_optimizer_state", crash_at_step_3)
    run = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        our_run(tmp_path, run, tp=1, **checkpoints)
    destroy_model_parallel()  # the crashed run did not get to it
    monkeypatch.setattr(trainer_module, "save_optimizer_state", real_save)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert [p.name for p in run.glob(".checkpoint-3.saving-*")], "the interrupted save was not left aside"
    resumed = training_cases.our_run(tmp_path, run, tp=1, resume=True, **checkpoints)
    keys = ("loss", "grad_norm", "learning_rate")
    assert [[e[k] for k in keys] for e in resumed[0]] == [[e[k] for k in keys] for e in uninterrupted[0]]
    for name in uninterrupted[1]:
        torch.testing.assert_close(resumed[1][name], uninterrupted[1][name], rtol=0, atol=0, msg=name)
