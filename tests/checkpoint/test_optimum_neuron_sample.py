"""A LoRA checkpoint written by optimum-neuron itself (tests/fixtures/optimum_neuron_adapter_sample, see the README
there): consolidate / verify / reshard give exactly what optimum-neuron's own consolidation gives, PEFT loads it, and
the project's writer (the fixture generator of every other optimum-neuron test) reproduces its files exactly."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from consolidation_helpers import assert_bit_equal, write_optimum_neuron_adapters
from optimum_neuron_peft.checkpoint import consolidate, reshard
from optimum_neuron_peft.formats.torch_zip import open_torch_state_dict

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "optimum_neuron_adapter_sample"
ADAPTERS = ("default", "second")
TP, KV_SIZE_MULTIPLIER = 4, 2  # as the sample was trained (its README)


def expected(adapter: str) -> dict[str, torch.Tensor]:
    return load_file(SAMPLE / "expected" / f"{adapter}.safetensors")


def adapter_config(adapter: str) -> dict:
    return json.loads((SAMPLE / "checkpoint" / f"adapter_{adapter}" / "adapter_config.json").read_text())


def assert_matches_optimum_neuron_consolidation(out: Path) -> None:
    """``out/<adapter>`` holds exactly optimum-neuron's consolidation, and vanilla PEFT loads it onto the base model
    with no missing or unexpected adapter key."""
    for adapter in ADAPTERS:
        directory = out / adapter
        got, want = load_file(directory / "adapter_model.safetensors"), expected(adapter)
        assert sorted(got) == sorted(want)
        for name in want:
            assert_bit_equal(got[name], want[name], name)
        config = json.loads((directory / "adapter_config.json").read_text())
        assert sorted(config["target_modules"]) == sorted(adapter_config(adapter)["target_modules"])
        assert config["r"] == adapter_config(adapter)["r"]

        base = transformers.AutoModelForCausalLM.from_pretrained(SAMPLE / "base")
        model = peft.PeftModel.from_pretrained(base, directory, adapter_name=adapter)
        loaded = peft.get_peft_model_state_dict(model, adapter_name=adapter)
        assert sorted(loaded) == sorted(want)
        for name in want:
            assert_bit_equal(loaded[name], want[name], name)


def test_consolidation_equals_optimum_neurons_own(tmp_path):
    result = consolidate(SAMPLE / "checkpoint", tmp_path / "out")
    assert set(result.directories) == set(ADAPTERS)
    assert_matches_optimum_neuron_consolidation(tmp_path / "out")


def test_cli_consolidate_then_verify(tmp_path, capsys):
    from optimum_neuron_peft.cli import main

    assert main(["consolidate", str(SAMPLE / "checkpoint"), str(tmp_path / "out"), "--verify"]) == 0
    assert main(["verify", str(SAMPLE / "checkpoint"), str(tmp_path / "out")]) == 0
    assert "all bit-exact" in capsys.readouterr().out
    assert_matches_optimum_neuron_consolidation(tmp_path / "out")


@pytest.mark.parametrize("tp_size", [2, 8])
def test_reshard_then_consolidate_gives_the_same_adapters(tmp_path, tp_size):
    reshard(SAMPLE / "checkpoint", tmp_path / "resharded", tp_size=tp_size)
    consolidate(tmp_path / "resharded", tmp_path / "out")
    assert_matches_optimum_neuron_consolidation(tmp_path / "out")


def test_our_writer_reproduces_optimum_neurons_files(tmp_path):
    """The writer, fed the consolidated adapters, writes the sample's files: same rank-file keys and tensors (bit for
    bit), same metadata, same marker files. Every optimum-neuron test builds its checkpoints through it."""
    config = transformers.AutoConfig.from_pretrained(SAMPLE / "base")
    adapters = {name: (expected(name), adapter_config(name)) for name in ADAPTERS}
    write_optimum_neuron_adapters(
        tmp_path, config, TP, adapters, kv_size_multiplier=KV_SIZE_MULTIPLIER, write_config=False
    )
    for name in ADAPTERS:
        ours, theirs = tmp_path / f"adapter_{name}" / "adapter_shards", SAMPLE / "checkpoint" / f"adapter_{name}" / "adapter_shards"
        listing = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))  # noqa: E731
        assert listing(ours) == listing(theirs)
        assert json.loads((ours / "mp_metadata_pp_rank_0.json").read_text()) == json.loads(
            (theirs / "mp_metadata_pp_rank_0.json").read_text()
        )
        for tp_rank in range(TP):
            file = f"model/dp_rank_00_tp_rank_{tp_rank:02d}_pp_rank_00.pt"
            mine, reference = open_torch_state_dict(ours / file), torch.load(theirs / file, weights_only=True)
            assert list(mine) == list(reference)  # same keys in the same order
            for key, tensor in reference.items():
                assert_bit_equal(mine[key].load(), tensor, f"{name} rank {tp_rank} {key}")
