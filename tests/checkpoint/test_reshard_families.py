"""`reshard` of a Transformers directory of every family (Llama, Mistral, Qwen3, Granite), laid out by the plan.

Each tiny model is built locally from Transformers' config classes with random weights (norms and biases made
non-trivial). Sharded at tp 2 and 4, it consolidates back bit-exactly; in a tp process group, every rank file
equals what our model loads from the Transformers directory, its metadata equals our model's, and our model with the
resharded weights gives Transformers' logits. The CLI shards a Qwen3 directory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from optimum_neuron_peft.checkpoint.consolidate import consolidate
from optimum_neuron_peft.checkpoint.reshard import reshard
from optimum_neuron_peft.checkpoint.native_format import metadata_path, rank_file_path
from optimum_neuron_peft.errors import CheckpointError
from optimum_neuron_peft.parallel.launch import spawn

from consolidation_helpers import assert_model_loads_equal

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)  # fmt: skip
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=3)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=True)),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, dict(
        num_key_value_heads=4, mlp_bias=True, embedding_multiplier=3.0, attention_multiplier=0.3,
        residual_multiplier=0.5, logits_scaling=2.5)),
}  # fmt: skip
TP_SIZES = (2, 4)
IDS = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _save_family(family: str, root) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(sum(map(ord, family)))
    model = model_cls(config_cls(**{**COMMON, **extra})).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them tell a wrong mapping apart
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / family, safe_serialization=True)
    with torch.no_grad():
        logits = model(IDS).logits
    return {k: v.clone() for k, v in model.state_dict().items()}, logits


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """family -> (Transformers state dict, logits); every family resharded at every tp under root/<family>_tp<n>."""
    root = tmp_path_factory.mktemp("families")
    refs = {family: _save_family(family, root) for family in FAMILIES}
    for family in FAMILIES:
        for tp in TP_SIZES:
            reshard(root / family, root / f"{family}_tp{tp}", tp_size=tp)
    return root, refs


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact(resharded, family, tp, tmp_path):
    root, refs = resharded
    consolidate(root / f"{family}_tp{tp}", tmp_path / "out", verify=True)
    assert_model_loads_equal(tmp_path / "out", refs[family][0])


def test_sharded_to_sharded_round_trip(resharded, tmp_path):
    root, refs = resharded
    reshard(root / "granite_tp4", tmp_path / "tp2", tp_size=2)
    consolidate(tmp_path / "tp2", tmp_path / "out", verify=True)
    assert_model_loads_equal(tmp_path / "out", refs["granite"][0])


def _rank_files(checkpoint, tp_rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(rank_file_path(checkpoint, tp_rank, 0, None))
    return tensors, json.loads(metadata_path(checkpoint, 0, None).read_text())


def _check_ranks(rank: int, world: int, root: str) -> dict[str, float]:
    """Worker (tp = world): per family, rank files vs our model loaded from Transformers, and logits."""
    from pathlib import Path

    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.models.loading import assign_parameters
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=world)
    out = {}
    try:
        for family in FAMILIES:
            model = AutoModelForCausalLM.from_pretrained(Path(root) / family)
            tensors, metadata = _rank_files(Path(root) / f"{family}_tp{world}", rank)
            ours = model.sharded_state_dict()
            assert sorted(tensors) == sorted(ours), (family, sorted(set(tensors) ^ set(ours)))
            for name, tensor in tensors.items():
                assert torch.equal(tensor, ours[name]), (family, name)
            assert metadata == json.loads(json.dumps(model.parameters_metadata())), family
            # Overwrite the loaded weights by the resharded ones: the logits must still be Transformers'.
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            assign_parameters(model, tensors)
            with torch.no_grad():
                out[family] = model(IDS).logits
    finally:
        destroy_model_parallel()
    return out


@pytest.mark.parametrize("tp", TP_SIZES)
def test_rank_files_match_our_model_and_logits_match_transformers(resharded, tp):
    root, refs = resharded
    results = spawn(_check_ranks, tp, str(root), timeout_s=300)
    for family, (_, logits) in refs.items():
        for rank_logits in results:
            torch.testing.assert_close(rank_logits[family], logits, rtol=1e-5, atol=1e-5, msg=family)


def test_cli_reshards_qwen3(resharded, tmp_path):
    root, refs = resharded
    done = subprocess.run(
        [sys.executable, "-m", "optimum_neuron_peft", "reshard", str(root / "qwen3"), str(tmp_path / "tp2"), "--tp-size", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resharded to tp=2" in done.stdout
    for rank in range(2):
        ours, _ = _rank_files(tmp_path / "tp2", rank)
        api, _ = _rank_files(root / "qwen3_tp2", rank)
        assert list(ours) == list(api) and all(torch.equal(ours[n], api[n]) for n in api)
    consolidate(tmp_path / "tp2", tmp_path / "out", verify=True)
    assert_model_loads_equal(tmp_path / "out", refs["qwen3"][0])


def test_unsupported_family_is_refused(resharded, tmp_path):
    root, _ = resharded
    source = tmp_path / "gpt"
    source.mkdir()
    config = json.loads((root / "llama" / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    (source / "model.safetensors").write_bytes((root / "llama" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' cannot be sharded.*supported: granite, llama, mistral, qwen3"):
        reshard(source, tmp_path / "out", tp_size=2)
