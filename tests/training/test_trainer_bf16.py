"""The bf16 policy through the Trainer (docs/peft.md, docs/training.md).

- Built from a directory with ``bf16=True``: the base is loaded in bf16, LoRA parameters and the optimizer state
  are fp32, and accelerate's autocast is off (it would run the fp32 LoRA branch in bf16). The logged losses track
  the fp32 run within rtol 1e-3 over the 4 steps (measured 1e-5 to 3e-5: each loss averages the bf16 roundings of
  128 tokens' logits, one rounding being 2^-9 relative).
- A bf16 model the user built: nothing is cast. An fp32 model with ``bf16=True``: transformers' autocast, as
  transformers.Trainer does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from training_cases import common_args, dataset, lora_config, make_adapter, make_base

from optimum_neuron_peft.models import AutoModelForCausalLM
from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
from optimum_neuron_peft.peft import PeftModel
from optimum_neuron_peft.training import Trainer, TrainingArguments

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
LOSS_RTOL = 1e-3  # measured 1e-5..3e-5: a loss averages bf16 roundings (2^-9 each) over 128 tokens


def _from_dir(root: Path, name: str, **overrides) -> Trainer:
    args = TrainingArguments(output_dir=str(root / name), tensor_parallel_size=1, **common_args(**overrides))
    return Trainer(model=str(make_base(root)), args=args, peft_config=lora_config(), train_dataset=dataset(),
                   data_collator=transformers.default_data_collator)  # fmt: skip


def _dtypes(model, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


@pytest.fixture
def parallel_state():
    initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    destroy_model_parallel()


def test_bf16_trainer_from_directory(tmp_path, parallel_state):
    fp32 = _from_dir(tmp_path, "fp32")
    fp32.train()
    bf16 = _from_dir(tmp_path, "bf16", bf16=True)
    assert _dtypes(bf16.model, trainable=False) == {torch.bfloat16}
    assert _dtypes(bf16.model, trainable=True) == {torch.float32}
    assert bf16.accelerator.mixed_precision == "no"  # no autocast over the bf16 base
    bf16.train()
    assert _dtypes(bf16.model, trainable=True) == {torch.float32}
    state = [v for s in bf16.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    assert state and {v.dtype for v in state} == {torch.float32}
    got = [e["loss"] for e in bf16.state.log_history if "loss" in e]
    expected = [e["loss"] for e in fp32.state.log_history if "loss" in e]
    assert len(got) == len(expected) == 4
    assert got != expected  # the base really is bf16
    assert got == pytest.approx(expected, rel=LOSS_RTOL), f"bf16 {got} vs fp32 {expected}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_user_model_is_not_cast(tmp_path, parallel_state, dtype):
    model = AutoModelForCausalLM.from_pretrained(make_base(tmp_path), torch_dtype=dtype)
    model = PeftModel.from_pretrained(model, make_adapter(tmp_path), is_trainable=True)
    before = {n: p.dtype for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **common_args(bf16=True, max_steps=1))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      data_collator=transformers.default_data_collator)  # fmt: skip
    trainer.train()
    assert {n: p.dtype for n, p in model.named_parameters()} == before
    assert _dtypes(model, trainable=True) == {torch.float32}
    # transformers.Trainer's choice for an fp32 model with bf16=True is autocast; over a bf16 base, none
    assert trainer.accelerator.mixed_precision == ("no" if dtype == torch.bfloat16 else "bf16")
