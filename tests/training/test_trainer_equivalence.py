"""Our Trainer trains exactly like transformers.Trainer + vanilla PEFT, and resumes exactly, at any tp x dp.

Every run starts from the same vanilla adapter (non-zero lora_B) on a tiny GQA Llama (4 query heads, 1 kv head:
replicated at tp 2 and 4), with gradient accumulation (rows with different label-token counts), a linear schedule
with warmup, weight decay and clipping that acts (max_grad_norm below the norms). Compared: log_history's loss,
grad_norm, learning_rate and num_input_tokens_seen at every step, the trained adapter written by ``save_model``
and the eval_loss of ``evaluate()`` (rtol 1e-4), at tp 1, 2 and 4 with and without sequence parallelism and at
tp 2 x dp 2. References: transformers.Trainer in one process, and in 2 DDP gloo processes for tp 2 x dp 2.
Resumed runs (same layout: bit for bit; tp 2 -> 1, tp 2 x dp 2 -> tp 4 x dp 1) equal the uninterrupted ones.
tp 2 x dp 2 with ZeRO-1 equals it without, bit for bit. Spawns of 4 processes are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_cases import (
    LOG_KEYS,
    make_adapter,
    make_base,
    one_process_eval,
    our_run,
    reference_run,
    save_dir_initial_adapter,
    worker,
)

from optimum_neuron_peft.parallel import spawn

pytestmark = pytest.mark.distributed
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = Path(tmp_path_factory.mktemp("trainer"))
    make_base(root)
    make_adapter(root)
    save_dir_initial_adapter(root)
    return root


@pytest.fixture(scope="module")
def reference(root):
    return reference_run(root, root / "reference")


@pytest.fixture(scope="module")
def tp2_runs(root):
    checkpoints = dict(save_strategy="steps", save_steps=1, save_total_limit=2)
    runs = [
        ("tp2", "ours", dict(tp=2, **checkpoints)),
        ("tp2_sp_from_dir", "ours", dict(tp=2, sequence_parallel=True, from_dir=True)),
        ("tp2_resumed", "ours", dict(tp=2, resume=str(root / "tp2" / "checkpoint-3"))),
    ]
    return spawn(worker, 2, str(root), runs, timeout_s=600)[0]


def assert_same_training(got, expected, rtol=RTOL, atol=ATOL, eval_reference=None):
    """``eval_reference``: the run whose eval_loss to compare with, when not ``expected``."""
    (got_log, got_adapter, got_eval), (exp_log, exp_adapter, exp_eval) = got, expected
    if eval_reference is not None:
        exp_eval = eval_reference[2]
    assert got_eval == pytest.approx(exp_eval, rel=rtol, abs=atol), "evaluate(): eval_loss"
    assert len(got_log) == len(exp_log) > 0
    for step, (g, e) in enumerate(zip(got_log, exp_log), start=1):
        for key in LOG_KEYS:
            assert g[key] == pytest.approx(e[key], rel=rtol, abs=atol), f"step {step} {key}: {g[key]} != {e[key]}"
    assert sorted(got_adapter) == sorted(exp_adapter)
    for name in exp_adapter:
        torch.testing.assert_close(got_adapter[name], exp_adapter[name], rtol=rtol, atol=atol, msg=name)


def test_reference_trains(root, reference):
    """The comparison proves something: the adapter moved and clipping acted."""
    log, adapter, _ = reference
    initial = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    assert max((adapter[k] - initial[k]).abs().max().item() for k in adapter) > 1e-3
    assert all(e["grad_norm"] > 0.05 for e in log)  # above max_grad_norm: clipped every step


def test_tp1_equals_transformers_trainer(root, reference):
    assert_same_training(our_run(root, root / "tp1", tp=1), reference)


@pytest.mark.parametrize("name", ["tp2", "tp2_sp_from_dir"])
def test_tp2_equals_transformers_trainer(root, reference, tp2_runs, name):
    expected = reference if name == "tp2" else reference_run(root, root / "reference_dir", root / "dir_initial")
    assert_same_training(tp2_runs[name], expected)


def test_throughput_metrics(root):
    """Every training log carries the throughput metrics, consistent with the tokens and FLOPs of a step; the
    summary JSON is written at the end."""
    from training_cases import SEQ, lora_config, make_base
    from transformers import AutoConfig

    from optimum_neuron_peft.training.flops import model_step_flops

    peak = 2e9  # FLOP/s of one device, so that the MFU is logged
    log, _, _ = our_run(root, root / "tp1_metrics", tp=1, logging_steps=2, peak_flops_per_device=peak)
    tokens_per_step = 2 * 2 * SEQ  # per_device_train_batch_size x gradient_accumulation_steps x dp, full rows
    flops_per_step = 2 * model_step_flops(AutoConfig.from_pretrained(make_base(root)), lora_config(), 2, SEQ).total
    assert len(log) == 2
    for entry in log:
        assert entry["tokens_per_second"] * entry["step_time"] == pytest.approx(tokens_per_step, rel=1e-6)
        assert entry["tokens_per_second_per_device"] == entry["tokens_per_second"]  # one device
        assert entry["flops_per_second"] * entry["step_time"] == pytest.approx(flops_per_step, rel=1e-6)
        assert 10 < entry["peak_host_memory_mb"] < 1e6
        assert entry["mfu"] == pytest.approx(entry["flops_per_second"] / peak, rel=1e-9)
    summary = json.loads((root / "tp1_metrics" / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 4 * tokens_per_step
    assert summary["flops"] == 4 * flops_per_step
    assert summary["mfu"] == pytest.approx(summary["flops_per_second"] / peak, rel=1e-9)


def test_resume_same_layout_is_bit_exact(tp2_runs):
    assert_same_training(tp2_runs["tp2_resumed"], tp2_runs["tp2"], rtol=0, atol=0)


def test_resume_at_another_tp_size(root, tp2_runs):
    """A tp 2 checkpoint (step 3 of 4, mid-epoch) continues at tp 1 like the uninterrupted tp 2 run."""
    assert_same_training(our_run(root, root / "tp1_resumed", tp=1, resume=str(root / "tp2" / "checkpoint-3")),
                         tp2_runs["tp2"])  # fmt: skip


def test_checkpoint_contents(root, tp2_runs):
    run = root / "tp2"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3",
                                                                                         "checkpoint-4"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "a staging directory was left behind"
    ckpt = run / "checkpoint-4"
    for name in ("adapter/adapter_default/adapter_config.json", "optimizer.safetensors", "optimizer.json",
                 "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "layout.json"):  # fmt: skip
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "layout.json").read_text())["tensor_parallel_size"] == 2
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 4
    # the optimizer moments are stored in the adapter's original names, one per LoRA tensor
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    expected = {f"{k}/{n.removeprefix('base_model.model.')}" for k in ("exp_avg", "exp_avg_sq") for n in adapter}
    assert set(moments) == expected
    for name, value in moments.items():
        original = adapter["base_model.model." + name.split("/", 1)[1]]
        assert value.shape == original.shape, name


@pytest.fixture(scope="module")
def dp_runs(root):
    reference_ddp = spawn(worker, 2, str(root), [("reference_ddp", "reference", {})], timeout_s=600)[0]
    runs = [
        ("tp2dp2", "ours", dict(tp=2, sequence_parallel=True, save_strategy="steps", save_steps=1,
                                save_total_limit=2)),  # fmt: skip
        ("tp2dp2_zero1", "ours", dict(tp=2, sequence_parallel=True, zero_1=True)),
        ("tp4", "ours", dict(tp=4)),
        ("tp4_sp", "ours", dict(tp=4, sequence_parallel=True)),
        # the same global batch (4 rows x 2 micro-batches x dp 1) from the tp 2 x dp 2 checkpoint
        ("tp4_resumed", "ours", dict(tp=4, per_device_train_batch_size=4,
                                     resume=str(root / "tp2dp2" / "checkpoint-3"))),  # fmt: skip
    ]
    results = {**reference_ddp, **spawn(worker, 4, str(root), runs, timeout_s=900)[0]}
    results["reference_ddp_adapter_one_process_eval"] = (None, None, one_process_eval(root, root / "reference_ddp"))
    return results


@pytest.mark.slow
def test_tp2_dp2_equals_transformers_trainer_ddp(reference, dp_runs):
    """Training equals DDP's. Evaluation equals the one-process evaluation of the same adapter: every replica
    evaluates the whole set. transformers under DDP pads a short last batch with repeated rows on some ranks, and
    the batch losses then differ from its own one-process ones."""
    ddp_adapter, one_process_adapter = dp_runs["reference_ddp"][1], reference[1]
    assert any(not torch.equal(ddp_adapter[k], one_process_adapter[k]) for k in ddp_adapter)  # dp changes the run
    single_eval_of_ddp_adapter = dp_runs["reference_ddp_adapter_one_process_eval"]
    assert_same_training(dp_runs["tp2dp2"], dp_runs["reference_ddp"], eval_reference=single_eval_of_ddp_adapter)


@pytest.mark.slow
def test_tp2_dp2_zero1_equals_unsharded(dp_runs):
    """ZeRO-1 over each tp rank's dp group: the same training bit for bit (tests/training/test_trainer_zero1.py)."""
    assert_same_training(dp_runs["tp2dp2_zero1"], dp_runs["tp2dp2"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp4", "tp4_sp"])
def test_tp4_equals_transformers_trainer(reference, dp_runs, name):
    assert_same_training(dp_runs[name], reference)


@pytest.mark.slow
def test_resume_at_another_tp_and_dp_size(dp_runs):
    assert_same_training(dp_runs["tp4_resumed"], dp_runs["tp2dp2"])
