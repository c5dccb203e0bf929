"""The frozen-base FLOP formula equals what torch.utils.flop_counter.FlopCounterMode counts on a Transformers Llama
with vanilla PEFT LoRA (eager attention, so that attention runs as aten.bmm, which the counter counts), term by term:
aten.mm = the linear layers (base, LoRA, lm_head), aten.bmm = attention, forward and backward counted separately."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_neuron_peft.training.flops import (
    PEAK_FLOPS_PER_CORE,
    DecoderShape,
    LoraPlacement,
    model_step_flops,
    peak_flops,
    throughput,
    train_step_flops,
)

CONFIG = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
BATCH, SEQ = 3, 7


def _counted(lora_config: LoraConfig, inputs_require_grad: bool = False, **config) -> tuple[dict, dict]:
    """(forward, backward) counts by op of one training step of Transformers + PEFT."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**CONFIG, **config})
    cfg._attn_implementation = "eager"
    model = get_peft_model(LlamaForCausalLM(cfg), lora_config)
    if inputs_require_grad:
        model.enable_input_require_grads()
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    with FlopCounterMode(display=False) as forward:
        loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # the base stayed frozen
    by_op = lambda mode: {str(op): n for op, n in mode.get_flop_counts()["Global"].items()}  # noqa: E731
    return by_op(forward), by_op(backward)


CASES = {
    "q_v": dict(target_modules=["q_proj", "v_proj"]),
    "k_only": dict(target_modules=["k_proj"]),
    "v_only": dict(target_modules=["v_proj"]),
    "o_and_lm_head": dict(target_modules=["o_proj", "lm_head"]),
    "down_only": dict(target_modules=["down_proj"]),
    "gate_up": dict(target_modules=["gate_proj", "up_proj"]),
    "all_linear": dict(target_modules="all-linear"),
    "regex_rank_pattern": dict(target_modules=r".*\.(q_proj|down_proj)", rank_pattern={"down_proj": 2}),
    "late_layers": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1, 2]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_formula_equals_flop_counter(case):
    lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **CASES[case])
    forward, backward = _counted(lora_config)
    ours = model_step_flops(LlamaConfig(**CONFIG), lora_config, BATCH, SEQ)
    assert (forward["aten.mm"], forward["aten.bmm"]) == (ours.base_forward + ours.lora_forward, ours.attention_forward)
    assert (backward.get("aten.mm", 0), backward.get("aten.bmm", 0)) == (
        ours.base_input_grad + ours.lora_backward, ours.attention_backward)  # fmt: skip
    assert sum(forward.values()) + sum(backward.values()) == ours.total


def test_inputs_require_grad_and_mha():
    """With gradient checkpointing's input grads the first layer computes input gradients too; plain MHA."""
    lora_config = LoraConfig(r=3, lora_dropout=0.0, target_modules=["v_proj", "gate_proj"])
    forward, backward = _counted(lora_config, inputs_require_grad=True, num_key_value_heads=4)
    ours = model_step_flops(LlamaConfig(**{**CONFIG, "num_key_value_heads": 4}), lora_config, BATCH, SEQ,
                            inputs_require_grad=True)  # fmt: skip
    assert (sum(forward.values()), sum(backward.values())) == (ours.forward, ours.backward)
    frozen_first_layer = model_step_flops(LlamaConfig(**{**CONFIG, "num_key_value_heads": 4}), lora_config, BATCH, SEQ)
    assert frozen_first_layer.backward < ours.backward and frozen_first_layer.forward == ours.forward


def test_frozen_base_has_no_weight_gradients():
    """Against the dense 3x-forward rule: with LoRA on nothing but lm_head, backward = input grads of lm_head only."""
    shape = DecoderShape.from_config(LlamaConfig(**CONFIG))
    lora = LoraPlacement.uniform(shape.num_hidden_layers, ["lm_head"], 4)
    flops = train_step_flops(shape, lora, BATCH, SEQ)
    tokens = BATCH * SEQ
    assert flops.base_input_grad == 0 and flops.attention_backward == 0  # nothing before lm_head needs a gradient
    assert flops.lora_backward == 2 * tokens * 4 * (shape.hidden_size + 2 * shape.vocab_size)
    everything = train_step_flops(shape, LoraPlacement.uniform(shape.num_hidden_layers, ["q_proj"], 4), BATCH, SEQ)
    assert everything.backward < 2 * everything.forward  # a dense model's backward would be 2x its forward


def test_peak_table_and_mfu():
    assert peak_flops("trn1", "bf16") == 95e12 and peak_flops("trn2", "torch.float32") == 181e12 / 8
    assert set(PEAK_FLOPS_PER_CORE) == {(h, d) for h in ("trn1", "trn2") for d in ("bf16", "fp32")}
    t = throughput(step_flops=8e12, step_seconds=2.0, num_devices=4, peak_per_device=2e12)
    assert (t.flops_per_second, t.flops_per_second_per_device, t.mfu) == (4e12, 1e12, 0.5)
    assert throughput(1e9, 1.0, 1).mfu is None  # CPU: achieved FLOP/s only
    with pytest.raises(ValueError, match="peak_flops: expected hardware"):
        peak_flops("h100", "bf16")
    with pytest.raises(ValueError, match="step_seconds"):
        throughput(1.0, 0.0, 1)
    with pytest.raises(ValueError, match="target_modules"):
        LoraPlacement.uniform(2, ["embed_tokens"], 4)
    with pytest.raises(ValueError, match="use_dora"):
        LoraPlacement.from_peft_config(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), 2)
