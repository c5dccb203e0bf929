"""``TrainingArguments(gradient_checkpointing=True)`` (transformers' deprecated alias of
``activation_checkpointing``) reaches the model's ``gradient_checkpointing_enable``: the decoder layers are
recomputed in backward, and the training is bit-identical to the run without it (fp32, dropout 0), tp 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from test_trainer_equivalence import assert_same_training
from training_cases import adapter_of, common_args, dataset, log_values, make_adapter, make_base

from optimum_neuron_peft.models import AutoModelForCausalLM
from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
from optimum_neuron_peft.peft import PeftModel
from optimum_neuron_peft.training import Trainer, TrainingArguments


def _run(root: Path, name: str, **overrides):
    """(log_history, adapter, eval_loss placeholder), forward starts of each layer's MLP (a pre-hook: the
    recomputation stops early after the last saved tensor, before the MLP returns), the model's flag."""
    initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(make_base(root), torch_dtype=torch.float32)
        model = PeftModel.from_pretrained(model, make_adapter(root), is_trainable=True)
        calls = [0, 0]
        for i, layer in enumerate(model.base_model.model.model.layers):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        args = TrainingArguments(output_dir=str(root / name), **common_args(**overrides))
        trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                          data_collator=transformers.default_data_collator)  # fmt: skip
        trainer.train()
        trainer.save_model(str(root / name / "final"))
        flag = model.base_model.model.is_gradient_checkpointing
        return (log_values(trainer.state.log_history), adapter_of(root / name / "final"), 0.0), calls, flag
    finally:
        destroy_model_parallel()


def test_gradient_checkpointing_is_bit_identical(tmp_path):
    plain, plain_calls, plain_flag = _run(tmp_path, "plain")
    checkpointed, calls, flag = _run(tmp_path, "checkpointed", gradient_checkpointing=True)
    assert (plain_flag, flag) == (False, True)
    micro_batches = 4 * 2  # max_steps x gradient_accumulation_steps
    assert plain_calls == [micro_batches] * 2 and calls == [2 * micro_batches] * 2  # forward, then recomputed
    assert_same_training(checkpointed, plain, rtol=0, atol=0)


def test_activation_checkpointing_kwargs_reach_the_model(tmp_path):
    """transformers' current name with its kwargs, handled as transformers does: ``every_n_layers=2``
    checkpoints layer 0 only; the rest (``preserve_rng_state``) go to torch.utils.checkpoint."""
    plain, _, _ = _run(tmp_path, "plain")
    got, calls, flag = _run(tmp_path, "every_2", activation_checkpointing=True,
                            activation_checkpointing_kwargs={"every_n_layers": 2,
                                                             "preserve_rng_state": False})  # fmt: skip
    assert flag and calls == [16, 8]
    assert_same_training(got, plain, rtol=0, atol=0)


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
