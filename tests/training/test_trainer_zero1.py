"""ZeRO-1 in the Trainer (``TrainingArguments.zero_1``): the same training as the unsharded optimizer, and
checkpoints that resume at another data-parallel size with or without ZeRO-1 on either side.

tp 1 x dp 2 (gloo spawn of 2): with ZeRO-1 the log_history and trained adapter equal the run without it bit for bit
(each parameter goes through the same AdamW arithmetic on its owning rank, then is broadcast). Resumed from
step 3 of 4: a ZeRO-1 dp 2 checkpoint at dp 1 (one process, the same global batch), and a plain dp 2 checkpoint
with ZeRO-1 on, both equal the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_trainer_equivalence import assert_same_training
from training_cases import make_adapter, make_base, our_run, worker

from optimum_neuron_peft.parallel import spawn

pytestmark = pytest.mark.distributed
CHECKPOINTS = dict(save_strategy="steps", save_steps=1, save_total_limit=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = Path(tmp_path_factory.mktemp("trainer_zero1"))
    make_base(root)
    make_adapter(root)
    return root


@pytest.fixture(scope="module")
def dp2_runs(root):
    runs = [
        ("dp2", "ours", dict(tp=1, **CHECKPOINTS)),
        ("dp2_zero1", "ours", dict(tp=1, zero_1=True, **CHECKPOINTS)),
        ("dp2_zero1_from_plain", "ours", dict(tp=1, zero_1=True, resume=str(root / "dp2" / "checkpoint-3"))),
    ]
    return spawn(worker, 2, str(root), runs, timeout_s=600)[0]


def test_zero1_optimizer_is_sharded(root):
    """The Trainer's optimizer is torch's ZeroRedundancyOptimizer over the dp group, with transformers' param
    groups (weight-decay split) and hyper-parameters; each rank holds state for its own parameters only."""
    results = spawn(_optimizer_facts, 2, str(root), timeout_s=300)
    facts0, facts1 = results
    assert facts0["type"] == facts1["type"] == "ZeroRedundancyOptimizer"
    assert facts0["groups"] == facts1["groups"] == facts0["transformers_groups"]
    assert (0.01, 2e-2) in facts0["groups"]  # weight_decay and learning_rate of common_args
    assert facts0["owned"] + facts1["owned"] == facts0["trainable"] and facts0["owned"] > 0 < facts1["owned"]


def _optimizer_facts(rank: int, world: int, root: str):
    import transformers
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from training_cases import common_args, dataset

    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
    from optimum_neuron_peft.peft import PeftModel
    from optimum_neuron_peft.training import Trainer, TrainingArguments

    initialize_model_parallel(tensor_model_parallel_size=1)
    model = AutoModelForCausalLM.from_pretrained(make_base(Path(root)))
    model = PeftModel.from_pretrained(model, make_adapter(Path(root)), is_trainable=True)
    args = TrainingArguments(output_dir=str(Path(root) / "facts"), zero_1=True, **common_args())
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      data_collator=transformers.default_data_collator)  # fmt: skip
    plain = transformers.Trainer.create_optimizer(trainer)  # what transformers builds (dp not involved)
    transformers_groups = [(g["weight_decay"], g["lr"]) for g in plain.param_groups]
    trainer.optimizer = None
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, ZeroRedundancyOptimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    facts = {
        "type": type(optimizer).__name__,
        "groups": [(g["weight_decay"], g["lr"]) for g in optimizer.param_groups],
        "owned": sum(len(g["params"]) for g in optimizer.optim.param_groups),
        "trainable": len(trainable),
        "transformers_groups": transformers_groups,
    }
    destroy_model_parallel()
    return facts


def test_zero1_equals_unsharded_optimizer(dp2_runs):
    assert_same_training(dp2_runs["dp2_zero1"], dp2_runs["dp2"], rtol=0, atol=0)


def test_plain_checkpoint_resumes_with_zero1(dp2_runs):
    assert_same_training(dp2_runs["dp2_zero1_from_plain"], dp2_runs["dp2"], rtol=0, atol=0)


def test_zero1_checkpoint_resumes_at_dp1(root, dp2_runs):
    """The same global batch (4 rows x 2 micro-batches x dp 1); another dp size reorders the fp32 sums: rtol 1e-6."""
    resumed = our_run(root, root / "dp1_resumed", tp=1, zero_1=True, per_device_train_batch_size=4,
                      resume=str(root / "dp2_zero1" / "checkpoint-3"))  # fmt: skip
    assert_same_training(resumed, dp2_runs["dp2_zero1"], rtol=1e-6, atol=1e-7)
