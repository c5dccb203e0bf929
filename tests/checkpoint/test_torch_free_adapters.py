"""Adapters in the torch-free engine: for every adapter layout (optimum-neuron's and ours, plain and xser, one or
several adapters, with and without the model, ``adapter=NAME``) the plain dispatch takes the torch-free engine,
writes every file byte for byte as the torch engine does, PEFT loads the result, and no torch is imported on that
path. The PEFT keys it checks the output against (`known_keys.expected_adapter_keys`) are pinned to PEFT's own."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from consolidation_helpers import adapter_state, assert_bit_equal, model_state, write_optimum_neuron, write_optimum_neuron_adapters, write_ours
from optimum_neuron_peft.checkpoint import verify
from optimum_neuron_peft.checkpoint.byte_verify import BytesVerified
from optimum_neuron_peft.checkpoint.consolidate import choose_engine, consolidate
from optimum_neuron_peft.checkpoint.engine_common import ConsolidateOptions
from optimum_neuron_peft.checkpoint.known_keys import _DEFAULT_FIELDS, _NEUTRAL_FIELDS, _llama_modules, expected_adapter_keys
from optimum_neuron_peft.checkpoint.tp_layout import LORA_TARGETS
from optimum_neuron_peft.errors import CheckpointError

from test_optimum_neuron_adapters import Case, model_config, reference_adapter

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "fixtures" / "optimum_neuron_adapter_sample" / "checkpoint"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Layout:
    """An adapter checkpoint: optimum-neuron's (``case``) or ours (``ours``: tp, adapters, with the model, fuse_qkv)."""

    case: Case | None = None
    ours: tuple | None = None
    with_model: bool = False
    adapter: str | None = None  # consolidate only this one
    write_config: bool = True
    extra: dict = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        what = f"ours-tp{self.ours[0]}-{len(self.ours[1])}adapters" + "-fuse_qkv" * self.ours[2] if self.ours else str(self.case)
        return what + "-with_model" * self.with_model + (f"-only_{self.adapter}" if self.adapter else "") + "-no_config" * (not self.write_config)


LAYOUTS = [
    Layout(Case(tp=2, kv_heads=2)),
    Layout(Case(tp=4, m=2, serialization="xser")),
    Layout(Case(tp=4, m=4, adapters=("default", "other"))),
    Layout(Case(tp=4, m=4, adapters=("default", "other")), adapter="other"),
    Layout(Case(tp=8, m=4, pp=2)),
    Layout(Case(tp=8, kv_heads=1, m=8, serialization="xser")),
    Layout(Case(tp=4, kv_heads=4, m=1, targets=("q_proj", "v_proj", "down_proj"))),
    Layout(Case(tp=8, m=4, kv_heads=2, fuse_qkv=True)),
    Layout(Case(tp=2, m=1, kv_heads=2, fuse_qkv=True, pp=2, serialization="xser")),
    Layout(Case(tp=4, heads=4, kv_heads=4, mha_fused_qkv=True, adapters=("a", "b"), serialization="xser")),
    Layout(Case(tp=4, m=2), write_config=False),
    Layout(Case(tp=2, kv_heads=2), with_model=True),
    Layout(ours=(2, ("default",), False)),
    Layout(ours=(4, ("default", "other"), True)),
    Layout(ours=(2, ("default",), False), with_model=True),
    Layout(ours=(4, ("default", "other"), False), with_model=True, adapter="default"),
]


def _write(root: Path, layout: Layout) -> tuple[Path, transformers.PretrainedConfig, dict]:
    """(checkpoint, base config, {adapter name: (PEFT state dict, adapter_config)})."""
    if layout.ours is not None:
        tp, names, fuse_qkv = layout.ours
        adapters = {name: adapter_state(seed=1 + i) for i, name in enumerate(names)}
        model = model_state(torch.bfloat16) if layout.with_model else None
        write_ours(root, tp, model=model, adapters=adapters, fuse_qkv=fuse_qkv)
        return root, transformers.AutoConfig.from_pretrained(root), adapters
    case = layout.case
    if layout.with_model:
        adapters = {"default": adapter_state(seed=1, shared_lora_a=True)}
        write_optimum_neuron(root, case.tp, model=model_state(torch.bfloat16), adapter=adapters["default"])
        return root, transformers.AutoConfig.from_pretrained(root), adapters
    config = model_config(case)
    adapters = {name: reference_adapter(config, case.targets, seed) for seed, name in enumerate(case.adapters)}
    write_optimum_neuron_adapters(
        root, config, case.tp, adapters, pp=case.pp, serialization=case.serialization, kv_size_multiplier=case.m,
        fuse_qkv=case.fuse_qkv, mha_fused_qkv=case.mha_fused_qkv, write_config=layout.write_config,
    )
    return root, config, adapters


def _assert_peft_loads(directory: Path, config, state: dict) -> None:
    """``PeftModel.from_pretrained`` finds every key: the loaded adapter equals the file (PEFT leaves a missing B at
    its zero init, and would name an unexpected key)."""
    saved = load_file(directory / "adapter_model.safetensors")
    assert sorted(saved) == sorted(state)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_config(config), directory)
    loaded = peft.get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(saved)
    for key in saved:
        assert_bit_equal(loaded[key], saved[key].to(loaded[key].dtype), key)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_adapters_take_the_torch_free_engine_and_write_the_torch_engines_bytes(tmp_path, layout):
    ckpt, config, adapters = _write(tmp_path / "ckpt", layout)
    choice = choose_engine(ckpt, ConsolidateOptions(adapter=layout.adapter))
    assert (choice.engine, choice.reason) == ("torch-free", None)
    free = consolidate(ckpt, tmp_path / "free", adapter=layout.adapter, verify=True)
    reference = consolidate(ckpt, tmp_path / "torch", adapter=layout.adapter, engine="torch")
    assert (free.engine, free.reason, reference.engine) == ("torch-free", None, "torch")
    verified = verify(ckpt, tmp_path / "torch", adapter=layout.adapter)  # every byte and every rank's copy, torch-free
    assert isinstance(verified, BytesVerified) and (verified.tensors, verified.bytes) == (free.tensors, free.bytes)
    assert (free.tensors, free.bytes, free.directories) == (reference.tensors, reference.bytes, {k: tmp_path / "free" / v.relative_to(tmp_path / "torch") for k, v in reference.directories.items()})
    assert _files(tmp_path / "free") == _files(tmp_path / "torch")  # every file, byte for byte
    for name, directory in free.directories.items():
        if name != "model":
            config_json = json.loads((directory / "adapter_config.json").read_text())
            assert config_json["target_modules"] == sorted(adapters[name][1]["target_modules"])  # original names
            _assert_peft_loads(directory, config, adapters[name][0])


def test_the_optimum_neuron_sample_takes_the_torch_free_engine(tmp_path):
    result = consolidate(SAMPLE, tmp_path / "free")
    assert result.engine == "torch-free" and set(result.directories) == {"default", "second"}
    consolidate(SAMPLE, tmp_path / "torch", engine="torch")
    assert _files(tmp_path / "free") == _files(tmp_path / "torch")
    expected = SAMPLE.parent / "expected"
    for name in ("default", "second"):
        got, want = load_file(tmp_path / "free" / name / "adapter_model.safetensors"), load_file(expected / f"{name}.safetensors")
        assert sorted(got) == sorted(want)
        for key in want:
            assert_bit_equal(got[key], want[key], key)


@pytest.mark.parametrize("checkpoint", ["sample", "with config.json"])
def test_an_adapter_is_consolidated_without_importing_torch(tmp_path, checkpoint):
    if checkpoint == "sample":
        ckpt = SAMPLE
    else:
        ckpt, _, _ = _write(tmp_path / "ckpt", Layout(Case(tp=4, m=2, serialization="xser")))
    code = (
        "import sys; from optimum_neuron_peft.cli import main; code = main(sys.argv[1:]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "assert not heavy, f'imported {heavy}'; sys.exit(code)"
    )
    argv = ["consolidate", str(ckpt), str(tmp_path / "free"), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("[torch-free engine]")
    consolidate(ckpt, tmp_path / "torch", engine="torch")
    assert _files(tmp_path / "free") == _files(tmp_path / "torch")


def test_an_adapter_peft_would_not_load_is_refused_alike(tmp_path):
    """A config.json with one layer fewer than the adapter: PEFT expects no layer-1 keys. Both engines refuse with
    the same one-line error, the torch-free one from the keys it derives, and publish nothing."""
    ckpt, _, _ = _write(tmp_path / "ckpt", Layout(Case(tp=2, kv_heads=2)))
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(config))
    assert choose_engine(ckpt, ConsolidateOptions()).engine == "torch-free"
    errors = []
    for engine in ("torch", "torch-free"):
        with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: PeftModel.from_pretrained would not load this output: \d+ keys it does not expect \(e.g. \['base_model.model.model.layers.1") as err:
            consolidate(ckpt, tmp_path / "out", engine=engine)
        assert not (tmp_path / "out").exists()
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]


@pytest.mark.parametrize("family", ["qwen3", "granite"])
def test_keys_not_derived_are_computed_by_a_child_process(tmp_path, family, monkeypatch):
    """An architecture `known_keys` does not derive: PEFT's keys come from a child process (torch, Transformers and
    PEFT imported there, not in the consolidating process), cached for the next run; same bytes as the torch engine."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    extra = {"head_dim": 16} if family == "qwen3" else {"residual_multiplier": 0.5}
    ckpt, config, adapters = _write(tmp_path / "ckpt", Layout(Case(tp=4, m=2, family=family, extra=extra)))
    code = (
        "import sys; from optimum_neuron_peft.checkpoint import consolidate; r = consolidate(sys.argv[1], sys.argv[2]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "assert not heavy, f'imported {heavy}'; assert r.engine == 'torch-free' and r.reason is None"
    )
    for run in ("child", "cached"):
        out = tmp_path / f"free-{run}"
        proc = subprocess.run([sys.executable, "-c", code, str(ckpt), str(out)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # written by the first run, read by the second
    consolidate(ckpt, tmp_path / "torch", engine="torch")
    for run in ("child", "cached"):
        assert _files(tmp_path / f"free-{run}") == _files(tmp_path / "torch")
    _assert_peft_loads(tmp_path / "free-child", config, adapters["default"][0])


def test_a_wrong_key_is_refused_through_the_child_process_too(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt, _, _ = _write(tmp_path / "ckpt", Layout(Case(tp=4, m=2, family="qwen3", extra={"head_dim": 16})))
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"], config["layer_types"] = 1, config["layer_types"][:1]
    (ckpt / "config.json").write_text(json.dumps(config))
    errors = []
    for engine in ("torch", "torch-free"):
        with pytest.raises(CheckpointError, match=r"PeftModel.from_pretrained would not load this output: \d+ keys it does not expect") as err:
            consolidate(ckpt, tmp_path / "out", engine=engine)
        assert not (tmp_path / "out").exists()
        errors.append(str(err.value))
    assert errors[0] == errors[1]


# ---------------------------------------------------------------------------------------------------------------------
# The LoRA keys derived from config.json and adapter_config.json, against PEFT's own

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 50}  # fmt: skip
LORA_CONFIGS = [
    {"target_modules": list(LORA_TARGETS)},
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["down_proj"], "r": 2, "lora_alpha": 4, "lora_dropout": 0.1},
    {"target_modules": ["model.layers.1.self_attn.o_proj", "gate_proj"]},
    {"target_modules": ["self_attn.k_proj", "mlp.up_proj"], "use_rslora": True},
    {"target_modules": r".*\.layers\.[02]\.self_attn\.(q|v)_proj"},
    {"target_modules": r".*_proj", "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
]
MODEL_FIELDS = [{}, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}, {"num_hidden_layers": 1}]


def _peft_keys(model_fields: dict, lora: dict) -> set[str]:
    fields = {**LLAMA, **model_fields}
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return set(peft.get_peft_model_state_dict(peft.get_peft_model(model, peft.LoraConfig(**lora))))


def _as_saved(config: dict) -> dict:
    """A LoraConfig dict as ``save_pretrained`` writes it to adapter_config.json (sets as lists, enums as values)."""
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(getattr(v, "value", v))))


@pytest.mark.parametrize("model_fields", MODEL_FIELDS, ids=str)
@pytest.mark.parametrize("lora", LORA_CONFIGS, ids=str)
def test_adapter_keys_derived_from_the_configs_are_peft_own(model_fields, lora):
    published = _as_saved({**peft.LoraConfig(**lora).to_dict(), "task_type": "CAUSAL_LM"})
    assert expected_adapter_keys({**LLAMA, **model_fields}, published) == _peft_keys(model_fields, lora)


def test_adapter_keys_are_not_derived_for_what_is_not_known():
    lora = _as_saved(peft.LoraConfig(target_modules=["q_proj"]).to_dict())
    assert expected_adapter_keys(LLAMA, lora) is not None
    unknown = [
        ({**LLAMA, "model_type": "qwen3"}, lora),
        (LLAMA, {**lora, "use_dora": True}), (LLAMA, {**lora, "bias": "all"}), (LLAMA, {**lora, "lora_bias": True}),
        (LLAMA, {**lora, "modules_to_save": ["lm_head"]}), (LLAMA, {**lora, "layers_to_transform": [0]}),
        (LLAMA, {**lora, "a_field_peft_may_add": 1}), (LLAMA, {**lora, "target_modules": "all-linear"}),
        (LLAMA, {**lora, "target_modules": ["lm_head"]}), (LLAMA, {**lora, "target_modules": ["embed_tokens"]}),
        (LLAMA, {**lora, "target_modules": ["self_attn"]}), (LLAMA, {**lora, "target_modules": ["nothing"]}),
        (LLAMA, {**lora, "target_modules": ".*"}), (LLAMA, {**lora, "target_modules": None}),
    ]  # fmt: skip
    for model, adapter in unknown:
        assert expected_adapter_keys(model, adapter) is None, adapter


def test_the_fields_known_are_peft_own():
    """Every LoraConfig field is classified; the key-changing ones are derived only at PEFT's defaults; the module
    names matched are the model's own."""
    defaults = peft.LoraConfig().to_dict()
    assert set(defaults) <= _NEUTRAL_FIELDS | set(_DEFAULT_FIELDS)
    assert {k: defaults[k] for k in _DEFAULT_FIELDS if k in defaults} == {k: v for k, v in _DEFAULT_FIELDS.items() if k in defaults}
    fields = {**LLAMA}
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sorted(_llama_modules(3)) == sorted(name for name, _ in model.named_modules())
