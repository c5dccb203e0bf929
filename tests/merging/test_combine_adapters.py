"""combine_adapters against PEFT's add_weighted_adapter on a tiny Llama."""

import json

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from optimum_neuron_peft.errors import MergeError
from optimum_neuron_peft.merging import combine_adapters
from optimum_neuron_peft.merging.adapter_io import load_adapter

from merging_tiny_models import save_adapter, save_base

EXACT = dict(rtol=0, atol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    save_base(root / "base")
    dirs = [
        save_adapter(root / "base", root / "a0", seed=1),
        save_adapter(root / "base", root / "a1", seed=2, alpha=16, targets=("q_proj", "v_proj", "o_proj")),
        save_adapter(root / "base", root / "a2", seed=3, alpha=4, use_rslora=True),
        save_adapter(root / "base", root / "r8", seed=4, r=8),
    ]
    return root, dirs


def _peft_combined(root, dirs, weights, combination_type, **kwargs):
    """PEFT's combined adapter, and the global RNG state when its first merge kernel ran.

    add_weighted_adapter initialises the new adapter (consuming random numbers) before merging, so DARE draws
    are compared from the state PEFT's kernels started from.
    """
    import peft.tuners.lora.model as lora_model

    states = []
    originals = {name: getattr(lora_model, name) for name in ("dare_linear", "dare_ties")}

    def recording(fn):
        def wrapper(*args, **kw):
            states.append(torch.get_rng_state())
            return fn(*args, **kw)
        return wrapper

    for name, fn in originals.items():
        setattr(lora_model, name, recording(fn))
    try:
        return _peft_combined_inner(root, dirs, weights, combination_type, **kwargs) + (states[:1] or [None],)
    finally:
        for name, fn in originals.items():
            setattr(lora_model, name, fn)


def _peft_combined_inner(root, dirs, weights, combination_type, **kwargs):
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), dirs[0], adapter_name="x0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"x{i}")
    model.add_weighted_adapter([f"x{i}" for i in range(len(dirs))], weights, "new", combination_type, **kwargs)
    state = get_peft_model_state_dict(model, adapter_name="new")
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    return model.peft_config["new"], {m: (state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]) for m in modules}


def _module_order(root):
    return [f"base_model.model.{n}" for n, _ in LlamaForCausalLM.from_pretrained(root / "base").named_modules()]


@pytest.mark.parametrize("combination_type", ["linear", "cat", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_bit_exact_types(setup, combination_type):
    root, dirs = setup
    dirs, weights = dirs[:3], [0.7, -0.4, 1.2]
    kwargs = {} if combination_type in ("linear", "cat") else {"density": 0.5}
    ref_config, ref, (state,) = _peft_combined(root, dirs, weights, combination_type, **kwargs)
    if state is not None:
        torch.set_rng_state(state)
    config, got = combine_adapters(dirs, weights, combination_type, module_order=_module_order(root), **kwargs)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name][0], ref[name][0], **EXACT)
        torch.testing.assert_close(got[name][1], ref[name][1], **EXACT)
    assert config["r"] == ref_config.r and set(config["target_modules"]) == set(ref_config.target_modules)


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
                                              "magnitude_prune_svd"])
def test_svd_types_same_delta(setup, combination_type):
    root, dirs = setup
    dirs, weights = [dirs[0], dirs[3]], [0.6, 0.9]  # ranks 4 and 8
    kwargs = {} if combination_type == "svd" else {"density": 0.6}
    _, ref, (state,) = _peft_combined(root, dirs, weights, combination_type, svd_rank=6, **kwargs)
    if state is not None:
        torch.set_rng_state(state)
    _, got = combine_adapters(dirs, weights, combination_type, svd_rank=6, module_order=_module_order(root),
                              **kwargs)
    for name in ref:  # the factors are unique up to the signs of singular vectors: compare the products
        torch.testing.assert_close(got[name][1] @ got[name][0], ref[name][1] @ ref[name][0], rtol=1e-4, atol=1e-5)


def test_svd_exact_rank_equals_weighted_sum_of_deltas(setup):
    root, dirs = setup
    adapters = [load_adapter(d) for d in dirs[:2]]
    weights = [0.5, -1.5]
    _, got = combine_adapters(dirs[:2], weights, "svd", svd_rank=8)
    _, cat = combine_adapters(dirs[:2], weights, "cat")
    for name, (A, B) in got.items():
        want = sum(w * a.modules[name].scaling * a.modules[name].B @ a.modules[name].A
                   for w, a in zip(weights, adapters) if name in a.modules)
        torch.testing.assert_close(B @ A, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cat[name][1] @ cat[name][0], want, rtol=1e-5, atol=1e-6)


def test_svd_clamp_matches_peft(setup):
    root, dirs = setup
    _, ref, _ = _peft_combined(root, dirs[:2], [1.0, 0.5], "svd", svd_clamp=0.9)
    _, got = combine_adapters(dirs[:2], [1.0, 0.5], "svd", svd_clamp=0.9)
    for name in ref:
        torch.testing.assert_close(got[name][0], ref[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[name][1], ref[name][1], rtol=1e-5, atol=1e-6)


def test_output_directory_loads_in_peft_and_fixes_rslora(setup, tmp_path):
    root, dirs = setup
    out = tmp_path / "out"
    combine_adapters([dirs[2], dirs[0]], [1.0, 1.0], "cat", output_dir=out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["use_rslora"] is False
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), out)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.scaling["default"] == 1.0
    a = [load_adapter(d).modules["base_model.model.model.layers.1.self_attn.v_proj"] for d in (dirs[2], dirs[0])]
    want = sum(m.scaling * m.B @ m.A for m in a)
    torch.testing.assert_close(layer.get_delta_weight("default"), want, rtol=1e-5, atol=1e-6)


def test_incompatible_adapters_write_nothing(setup, tmp_path):
    root, dirs = setup
    out = tmp_path / "never"
    with pytest.raises(MergeError, match="equal rank"):
        combine_adapters([dirs[0], dirs[3]], [1, 1], "ties", density=0.5, output_dir=out)
    with pytest.raises(MergeError, match="density"):
        combine_adapters(dirs[:2], [1, 1], "dare_ties", output_dir=out)
    with pytest.raises(MergeError, match="weights"):
        combine_adapters(dirs[:2], [1], "cat", output_dir=out)
    with pytest.raises(MergeError, match="combination_type"):
        combine_adapters(dirs[:2], [1, 1], "average", output_dir=out)
    other = tmp_path / "other_base"
    other.mkdir()
    for f in ("adapter_model.safetensors",):
        (other / f).write_bytes((dirs[0] / f).read_bytes())
    config = json.loads((dirs[0] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="different base models"):
        combine_adapters([dirs[0], other], [1, 1], "cat", output_dir=out)
    not_an_adapter = tmp_path / "not_an_adapter"  # the output may not be inside an input: a directory of its own
    not_an_adapter.mkdir()
    with pytest.raises(MergeError, match="adapter_config.json"):
        combine_adapters([dirs[0], not_an_adapter], [1, 1], "cat", output_dir=out)
    assert not out.exists()
