"""The LoRA branches add no activation collective: they share the base layers' (issue 16, speed).

At tp = 2, with and without sequence parallelism, one forward of the model with LoRA on all linears issues exactly
the collectives of the base model alone (column branches use the base layer's gathered input; row branches add
their partial result before the base layer's single reduction). In backward, LoRA's own collectives are the
parameter-gradient all-reduces of the replicated factors (lora_A of each column layer - one for a fused layer's
side-by-side A's -, lora_B of each row layer): 4 per decoder layer, each of parameter size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from collective_count import R, TOKENS, worker
from peft_cases import HIDDEN, LAYERS, hf_config

from optimum_neuron_peft.parallel import spawn

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("collective_count"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config()).save_pretrained(root)
    return spawn(worker, 2, str(root), timeout_s=240)


@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_lora_forward_issues_only_the_base_collectives(results, sp):
    for rank, per_rank in enumerate(results):
        assert per_rank[(sp, True)]["forward"] == per_rank[(sp, False)]["forward"], f"rank {rank}"
        assert sum(per_rank[(sp, False)]["forward"].values()) > 0


@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_lora_backward_adds_only_parameter_gradient_reductions(results, sp):
    # per decoder layer: q/k/v A's side by side (3r, hidden), o_proj B (hidden, r), gate/up A's (2r, hidden),
    # down_proj B (hidden, r)
    factors = [3 * R * HIDDEN, HIDDEN * R, 2 * R * HIDDEN, HIDDEN * R]
    rank_r_activations = {TOKENS * k * R for k in (1, 2, 3)}  # what an all-reduce of h's gradient would move
    assert not set(factors) & rank_r_activations
    for rank, per_rank in enumerate(results):
        reduced = [n for op, n in per_rank[(sp, True)]["backward_numels"] if op == "all_reduce"]
        assert sorted(n for n in reduced if n in factors) == sorted(factors * LAYERS), f"rank {rank}: {reduced}"
        assert not [n for n in reduced if n in rank_r_activations], f"rank {rank}: {reduced}"
