"""The tensor-parallel plan of the Llama-family models, as data: how every module is split, in one place.

All four supported families (Llama, Mistral, Qwen3, Granite) share one table, `MODULE_PLAN`; what differs between
them is in `FAMILIES` (Qwen3's q_norm / k_norm, Granite's multipliers, per-layer sliding windows). From the table:

- the model builds its parallel layers (`models.plan.ParallelPlan`) and its specs (`plan_specs.build_spec`);
- `parameter_entries` / `lora_entries` give the checkpoint metadata (docs/checkpoint_formats.md section 3);
- `original_shapes` gives the Transformers tensors a model is loaded from, and `reshard` shards them.

``LORA_PARTITION_DIM`` is the one LoRA sharding rule, read by the LoRA layers, the specs and the metadata.
Torch-free: the torch-free consolidation path may import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"

# The LoRA rule: which of lora_A (r, in) / lora_B (out, r) is sharded, on which dim, for a base layer of each kind;
# the other one is replicated. Column-parallel (output rows sharded): lora_B rows like the base rows. Row-parallel
# (input columns sharded): lora_A columns like the base columns. Vocab-parallel embedding (vocab rows sharded):
# lora_embedding_A (r, vocab) columns like the vocab rows.
LORA_PARTITION_DIM: dict[str, tuple[str, int]] = {COLUMN: ("lora_B", 0), ROW: ("lora_A", 1), VOCAB: ("lora_A", 1)}


def lora_partition_dim(parallel: str, lora: str) -> int | None:
    """The dim ``lora`` ("lora_A" / "lora_B") of a LoRA on a ``parallel`` base layer is sharded on, None: replicated."""
    sharded, dim = LORA_PARTITION_DIM[parallel]
    return dim if lora == sharded else None


def lora_partition_dims(parallel: str) -> tuple[int | None, int | None]:
    """(lora_A's, lora_B's) sharded dim on a ``parallel`` base layer; None: replicated."""
    return lora_partition_dim(parallel, "lora_A"), lora_partition_dim(parallel, "lora_B")


@dataclass(frozen=True)
class ModulePlan:
    """How one Transformers module is split over tensor-parallel ranks.

    ``shape``: its weight's shape in symbols of `dims` (V vocab, D hidden, I intermediate, Q = heads * head_dim,
    KV = key/value heads * head_dim, hd head_dim). ``fused``: the fused layer holding it (with its siblings).
    ``gqa``: its heads are placed by the GQA spec (q/k/v rows, o_proj columns). ``bias``: the config flag that gives
    it a bias, None: never one. ``family_flag``: only in families with this `Family` flag set.
    """

    parallel: str
    shape: tuple[str, ...]
    fused: str | None = None
    gqa: bool = False
    bias: str | None = None
    family_flag: str | None = None


LAYER = "model.layers.<i>"
# In the order the checkpoint metadata lists them (the order of files written before the table existed).
MODULE_PLAN: dict[str, ModulePlan] = {
    "model.embed_tokens": ModulePlan(VOCAB, ("V", "D")),
    f"{LAYER}.self_attn.q_proj": ModulePlan(COLUMN, ("Q", "D"), "qkv_proj", gqa=True, bias="attention_bias"),
    f"{LAYER}.self_attn.k_proj": ModulePlan(COLUMN, ("KV", "D"), "qkv_proj", gqa=True, bias="attention_bias"),
    f"{LAYER}.self_attn.v_proj": ModulePlan(COLUMN, ("KV", "D"), "qkv_proj", gqa=True, bias="attention_bias"),
    f"{LAYER}.self_attn.o_proj": ModulePlan(ROW, ("D", "Q"), gqa=True, bias="attention_bias"),
    f"{LAYER}.self_attn.q_norm": ModulePlan(REPLICATED, ("hd",), family_flag="qk_norm"),
    f"{LAYER}.self_attn.k_norm": ModulePlan(REPLICATED, ("hd",), family_flag="qk_norm"),
    f"{LAYER}.mlp.gate_proj": ModulePlan(COLUMN, ("I", "D"), "gate_up_proj", bias="mlp_bias"),
    f"{LAYER}.mlp.up_proj": ModulePlan(COLUMN, ("I", "D"), "gate_up_proj", bias="mlp_bias"),
    f"{LAYER}.mlp.down_proj": ModulePlan(ROW, ("D", "I"), bias="mlp_bias"),
    f"{LAYER}.input_layernorm": ModulePlan(REPLICATED, ("D",)),
    f"{LAYER}.post_attention_layernorm": ModulePlan(REPLICATED, ("D",)),
    "model.norm": ModulePlan(REPLICATED, ("D",)),
    "lm_head": ModulePlan(COLUMN, ("V", "D")),  # vocab rows, like the embedding; absent when tied to it
}
TIED_LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class FusedGroup:
    """Linears of one module computed by one fused column-parallel layer (rank r holds [a_r; b_r; ...])."""

    parent: str  # the module holding the linears ("self_attn")
    linears: tuple[str, ...]
    gqa: bool  # placed by the GQA spec (head blocks, key/value replication) instead of plain column fusion
    output: str | None = None  # the row-parallel projection whose columns follow the GQA head order


FUSED_GROUPS: dict[str, FusedGroup] = {
    "qkv_proj": FusedGroup("self_attn", ("q_proj", "k_proj", "v_proj"), gqa=True, output="o_proj"),
    "gate_up_proj": FusedGroup("mlp", ("gate_proj", "up_proj"), gqa=False),
}
# The linears a LoRA can target (PEFT's ``target_modules`` names).
LORA_TARGETS = tuple(n.rpartition(".")[2] for n, m in MODULE_PLAN.items() if LAYER in n and m.parallel in (COLUMN, ROW))


@dataclass(frozen=True)
class Family:
    """What a family adds to the shared plan (the switches of `models.config.architecture_config`)."""

    qk_norm: bool = False  # Qwen3: per-head RMSNorms on queries and keys
    granite: bool = False  # Granite: embedding / attention / residual / logits multipliers
    per_layer_sliding: bool = False  # sliding windows per layer (``layer_types``) instead of one for all layers


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen3": Family(qk_norm=True, per_layer_sliding=True),
    "granite": Family(granite=True),
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def family_of(config: Any) -> Family:
    """The `Family` of a Transformers config (object or dict) or an ArchitectureConfig, by ``model_type``."""
    model_type = _get(config, "model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Dims:
    """The sizes and switches of a config that the plan reads."""

    model_type: str
    layers: int
    V: int
    D: int
    I: int
    heads: int
    kv_heads: int
    hd: int
    attention_bias: bool
    mlp_bias: bool
    tied: bool
    family: Family

    @property
    def Q(self) -> int:
        return self.heads * self.hd

    @property
    def KV(self) -> int:
        return self.kv_heads * self.hd

    def shape(self, symbols: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(getattr(self, s) for s in symbols)

    def has(self, plan: ModulePlan) -> bool:
        return plan.family_flag is None or getattr(self.family, plan.family_flag)

    def has_bias(self, plan: ModulePlan) -> bool:
        return plan.bias is not None and getattr(self, plan.bias)


def dims_of(config: Any, family: Family | None = None) -> Dims:
    """The `Dims` of ``config``; ``family`` None: the one of its model_type (an unsupported one is an error)."""
    heads = _get(config, "num_attention_heads")
    hidden = _get(config, "hidden_size")
    return Dims(
        model_type=_get(config, "model_type"), layers=_get(config, "num_hidden_layers"), V=_get(config, "vocab_size"),
        D=hidden, I=_get(config, "intermediate_size"), heads=heads,
        kv_heads=_get(config, "num_key_value_heads") or heads, hd=_get(config, "head_dim") or hidden // heads,
        attention_bias=bool(_get(config, "attention_bias", False)), mlp_bias=bool(_get(config, "mlp_bias", False)),
        tied=bool(_get(config, "tie_word_embeddings", False)), family=family or family_of(config),
    )  # fmt: skip


def _modules(dims: Dims) -> Iterable[tuple[str, str, ModulePlan]]:
    """(module name, its name inside a layer or itself, plan) of every module of the model, in table order."""
    top = [(n, m) for n, m in MODULE_PLAN.items() if LAYER not in n]
    layer = [(n, m) for n, m in MODULE_PLAN.items() if LAYER in n]
    for name, plan in top[:1]:
        yield name, name, plan
    for i in range(dims.layers):
        for name, plan in layer:
            if dims.has(plan):
                yield name.replace("<i>", str(i)), name[len(LAYER) + 1:], plan
    for name, plan in top[1:]:
        if not (name == "lm_head" and dims.tied):
            yield name, name, plan


def original_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Transformers checkpoint of ``config``, with its full shape (tied lm_head left out)."""
    dims = dims_of(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, _, plan in _modules(dims):
        shapes[f"{name}.weight"] = dims.shape(plan.shape)
        if dims.has_bias(plan):
            shapes[f"{name}.bias"] = dims.shape(plan.shape[:1])
    return shapes


def linear_shapes(config: Any) -> dict[str, tuple[int, int]] | None:
    """(out, in) of each linear of a decoder layer, by its name (``q_proj``...), for any model_type; None when the
    config lacks a size."""
    try:
        dims = dims_of(config, Family())
        shapes = {
            name.rpartition(".")[2]: dims.shape(plan.shape)
            for name, plan in MODULE_PLAN.items()
            if name.rpartition(".")[2] in LORA_TARGETS
        }
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    if any(size is None for shape in shapes.values() for size in shape):
        return None
    return shapes  # type: ignore[return-value]


def sharded(dim: int, tp_size: int, stride: int = 1) -> dict[str, Any]:
    return {"tensor_model_parallel": True, "partition_dim": dim, "partition_stride": stride, "num_partitions": tp_size}


def replicated() -> dict[str, Any]:
    return {"tensor_model_parallel": False}


def _entry(plan: ModulePlan, param: str, tp_size: int, stride: int = 1) -> dict[str, Any]:
    if plan.parallel == REPLICATED or (plan.parallel == ROW and param == "bias"):  # a row-parallel bias is added once
        return replicated()
    return sharded(1 if plan.parallel == ROW else 0, tp_size, stride)


def parameter_entries(
    config: Any, tp_size: int, *, fuse_qkv: bool = False, mha_fused_qkv: bool = False
) -> dict[str, dict[str, Any]]:
    """Tensor-parallel attributes of every parameter of the training model (fused names, no LoRA), in metadata order.

    A GQA group is ``<fused>.weight_q/k/v`` (``weight_qkv`` with ``fuse_qkv``), each sharded on dim 0; a plain
    fused group (``mha_fused_qkv`` for q/k/v) is ``<fused>.weight`` with stride = number of linears.
    """
    dims = dims_of(config)
    out: dict[str, dict[str, Any]] = {}
    for name, local, plan in _modules(dims):
        params = ["weight", "bias"] if dims.has_bias(plan) else ["weight"]
        if plan.fused is None:
            for p in params:
                out[f"{name}.{p}"] = _entry(plan, p, tp_size)
            continue
        group = FUSED_GROUPS[plan.fused]
        if local != f"{group.parent}.{group.linears[0]}":
            continue  # the group is listed once, at its first linear
        fused = f"{name.rpartition('.')[0]}.{plan.fused}"
        if group.gqa and not mha_fused_qkv:
            for p in params:
                for s in ["qkv"] if fuse_qkv else ["q", "k", "v"]:
                    out[f"{fused}.{p}_{s}"] = _entry(plan, p, tp_size)
        else:
            for p in params:
                out[f"{fused}.{p}"] = _entry(plan, p, tp_size, stride=len(group.linears))
    return out


def lora_entries(
    config: Any, tp_size: int, targets: Iterable[str], *, mha_fused_qkv: bool = False
) -> dict[str, dict[str, Any]]:
    """Tensor-parallel attributes of the LoRA parameters (saved names, no adapter name) of ``targets``.

    LoRA of a fused linear is per projection: ``<fused>.lora_A.weight_<linear>`` (a GQA group names them by
    ``q`` / ``k`` / ``v``); of a plain linear ``<linear>.lora_A.weight``. Sharded by `LORA_PARTITION_DIM`.
    """
    targets = set(targets)
    unknown = targets - set(LORA_TARGETS)
    if unknown:
        raise ConfigError(f"LoRA target modules {sorted(unknown)} are not linears of the model {LORA_TARGETS}")
    dims = dims_of(config)
    # Per layer: the fused linears' LoRA first, then the plain ones (the order of files written before the table).
    fused_first: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name, local, plan in _modules(dims):
        linear = local.rpartition(".")[2]
        if linear not in targets or not name.startswith("model.layers."):
            continue
        fused_part, plain_part = fused_first.setdefault(int(name.split(".")[2]), ({}, {}))
        if plan.fused is None:
            names, part = {lora: f"{name}.{lora}.weight" for lora in ("lora_A", "lora_B")}, plain_part
        else:
            gqa = FUSED_GROUPS[plan.fused].gqa and not mha_fused_qkv
            suffix = linear[0] if gqa else linear  # the GQA spec names LoRA by q/k/v, FusedLinearsSpec by linear
            fused = f"{name.rpartition('.')[0]}.{plan.fused}"
            names, part = {lora: f"{fused}.{lora}.weight_{suffix}" for lora in ("lora_A", "lora_B")}, fused_part
        for lora, lora_name in names.items():
            dim = lora_partition_dim(plan.parallel, lora)
            part[lora_name] = replicated() if dim is None else sharded(dim, tp_size)
    out: dict[str, dict[str, Any]] = {}
    for i in sorted(fused_first):
        for part in fused_first[i]:
            out.update(part)
    return out
