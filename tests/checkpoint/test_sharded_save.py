"""Our sharded format: manifest, atomic single-process save, the distributed saver, and Transformers -> sharded."""

from __future__ import annotations

import json

import pytest
import torch

from optimum_neuron_peft.checkpoint.consolidate import consolidate
from optimum_neuron_peft.checkpoint.reshard import reshard
from optimum_neuron_peft.checkpoint.save import save_sharded_checkpoint, save_sharded_checkpoint_distributed
from optimum_neuron_peft.checkpoint.native_format import FORMAT_NAME, ShardedCheckpoint
from optimum_neuron_peft.checkpoint.tp_layout import plan_layout
from optimum_neuron_peft.errors import CheckpointError
from optimum_neuron_peft.parallel.launch import spawn

from consolidation_helpers import assert_model_loads_equal, llama_config, model_state, write_ours


def test_manifest_and_reader(tmp_path):
    write_ours(tmp_path / "ckpt", 2, 2, model=model_state(torch.bfloat16))
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_NAME and manifest["format_version"] == 1
    assert (manifest["kind"], manifest["tp_size"], manifest["pp_size"], manifest["dtype"]) == ("model", 2, 2, "bfloat16")
    assert "shards/model/tp_rank_01_pp_rank_01.safetensors" in manifest["files"]
    entry = manifest["files"]["shards/model/tp_rank_01_pp_rank_01.safetensors"]
    assert entry["size"] == (tmp_path / "ckpt" / "shards/model/tp_rank_01_pp_rank_01.safetensors").stat().st_size
    ckpt = ShardedCheckpoint.open(tmp_path / "ckpt", check_checksums=True)
    assert ckpt.model.tp_size == 2 and ckpt.model.pp_size == 2 and ckpt.adapters == {}


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    model = model_state(torch.float32)
    write_ours(tmp_path / "ckpt", 2, model=model)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    layout = plan_layout(llama_config(), 2)

    def failing():
        yield (0, 0), layout.shard(model, 0)
        raise RuntimeError("crash in the middle of a save")

    with pytest.raises(RuntimeError, match="crash in the middle"):
        save_sharded_checkpoint(tmp_path / "ckpt", failing(), layout.metadata_per_pp())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    ShardedCheckpoint.open(tmp_path / "ckpt", check_checksums=True)


def _distributed_save(rank, world_size, out, model, tp, pp):
    layout = plan_layout(llama_config(), tp, pp_size=pp)
    tp_rank, pp_rank = rank % tp, rank // tp
    save_sharded_checkpoint_distributed(
        out, layout.shard(model, tp_rank, pp_rank), layout.metadata(pp_rank), tp_rank=tp_rank, tp_size=tp,
        pp_rank=pp_rank, pp_size=pp, config=llama_config().to_dict(),
    )
    return rank


def _distributed_save_fails_on_rank_1(rank, world_size, out, model):
    layout = plan_layout(llama_config(), 2)
    local = layout.shard(model, rank)
    if rank == 1:
        local = {"bad": object()}  # cannot be written
    try:
        save_sharded_checkpoint_distributed(out, local, layout.metadata(0), tp_rank=rank, tp_size=2)
    except CheckpointError as err:
        return str(err)
    return "no error"


@pytest.mark.distributed
def test_distributed_saver_matches_single_process_and_is_atomic(tmp_path):
    model = model_state(torch.bfloat16)
    assert spawn(_distributed_save, 4, tmp_path / "dist", model, 2, 2) == [0, 1, 2, 3]
    write_ours(tmp_path / "single", 2, 2, model=model)
    for rank_file in sorted((tmp_path / "single" / "shards" / "model").iterdir()):
        assert (tmp_path / "dist" / "shards" / "model" / rank_file.name).read_bytes() == rank_file.read_bytes()
    consolidate(tmp_path / "dist", tmp_path / "out", verify=True)
    assert_model_loads_equal(tmp_path / "out", model)
    before = (tmp_path / "dist" / "manifest.json").read_bytes()
    errors = spawn(_distributed_save_fails_on_rank_1, 2, tmp_path / "dist", model)
    assert all("save failed on rank 1" in e for e in errors), errors
    assert (tmp_path / "dist" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "out", "single"]


def test_transformers_directory_to_sharded_and_back(tmp_path):
    import transformers

    model = transformers.LlamaForCausalLM(llama_config())
    model.save_pretrained(tmp_path / "hf")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    reshard(tmp_path / "hf", tmp_path / "tp4", tp_size=4)
    assert ShardedCheckpoint.open(tmp_path / "tp4").model.tp_size == 4
    consolidate(tmp_path / "tp4", tmp_path / "out", verify=True)
    assert_model_loads_equal(tmp_path / "out", expected)
