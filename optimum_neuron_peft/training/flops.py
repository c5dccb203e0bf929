"""FLOPs of one LoRA training step on a Llama-family decoder whose base weights are frozen, and MFU.

A dense-training estimate (6 x parameters x tokens) overstates LoRA fine-tuning by about a third: a frozen weight
gets no weight gradient, so its backward is one matmul (the gradient of its input), not two. This module counts,
per matmul, what autograd actually runs when only the LoRA weights require grad:

- every base projection and ``lm_head``: the forward matmul, plus the input-gradient matmul when its input
  requires grad (it does not before the first LoRA module: the embedding is frozen, so in the first layer the
  inputs of q/k/v/gate/up carry no gradient unless ``inputs_require_grad``, as under gradient checkpointing);
- every LoRA module ``B(A(x))``: the two forward matmuls, both weight gradients, the gradient of A's output, and
  the gradient of ``x`` when ``x`` requires grad;
- attention: ``Q K^T`` and ``P V`` forward; backward ``dQ``, ``dK``, ``dP``, ``dV`` as far as they are needed.
  Dense over the whole (seq x seq) square, as the kernels compute it (causal masking does not skip work), and
  without the recomputation a flash-attention backward performs: these are model FLOPs, the usual MFU numerator.

A matmul of (m x k) by (k x n) counts 2*m*k*n FLOPs, as ``torch.utils.flop_counter`` counts it; elementwise work
(norms, activations, softmax, rotary, loss) is left out, as there. ``tests/training/test_flops.py`` checks the count
against ``FlopCounterMode`` on a Transformers Llama with vanilla PEFT LoRA, term by term.

The counts are for the whole model on the whole global batch, independent of tensor/data parallelism (the sharded
layers split the same matmuls over ranks). MFU = FLOPs per step / (step time x devices x peak per device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# The module paths of a Transformers Llama-family model: the names PEFT configs target.
_MODULE_PATH = {**{p: "model.layers.{layer}.self_attn." + p for p in ATTENTION_PROJECTIONS},
                **{p: "model.layers.{layer}.mlp." + p for p in MLP_PROJECTIONS}}  # fmt: skip

# Dense matmul peak of one NeuronCore, FLOP/s, by (hardware, dtype). Sources (AWS Neuron documentation,
# "Trainium Architecture" and "Trainium2 Architecture" pages, awsdocs-neuron.readthedocs-hosted.com,
# about-neuron/arch/neuron-hardware/trainium.html and trainium2.html):
#   Trainium  (trn1): 2 NeuronCore-v2 per chip, 190 BF16/FP16/TF32 TFLOPS and 47.5 FP32 TFLOPS per chip;
#   Trainium2 (trn2): 8 NeuronCore-v3 per chip, 667 BF16/FP16/TF32 TFLOPS and 181 FP32 TFLOPS per chip (dense).
# Per core = per chip / cores per chip. With logical NeuronCores (trn2 LNC=2) one device is two of these.
PEAK_FLOPS_PER_CORE: dict[tuple[str, str], float] = {
    ("trn1", "bf16"): 190e12 / 2,
    ("trn1", "fp32"): 47.5e12 / 2,
    ("trn2", "bf16"): 667e12 / 8,
    ("trn2", "fp32"): 181e12 / 8,
}
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16", "float16": "bf16",  # same tensor engine rate
                  "fp32": "fp32", "float32": "fp32"}  # fmt: skip


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-family decoder that its matmul FLOPs depend on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecoderShape.{name}: expected a positive int, found {value!r}")

    @classmethod
    def from_config(cls, config: Any) -> "DecoderShape":
        """From a Transformers config (``LlamaConfig``...), our ``ArchitectureConfig``, or a dict of the same keys."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or (get("hidden_size") // heads if heads else None)
        return cls(get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), heads, kv_heads,
                   head_dim, get("vocab_size"))  # fmt: skip

    def projection_dims(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim  # fmt: skip
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, self.vocab_size)}[name]


@dataclass(frozen=True)
class LoraPlacement:
    """Which modules carry LoRA, and its rank there: ``ranks[(layer, projection)]``; ``lm_head`` under layer -1."""

    ranks: Mapping[tuple[int, str], int] = field(default_factory=dict)

    @classmethod
    def uniform(cls, num_layers: int, target_modules: Iterable[str], r: int) -> "LoraPlacement":
        targets = set(target_modules)
        unknown = targets - set(PROJECTIONS) - {"lm_head"}
        if unknown:
            raise ValueError(f"target_modules: expected names among {PROJECTIONS + ('lm_head',)}, "
                             f"found {sorted(unknown)}")  # fmt: skip
        ranks = {(layer, p): r for layer in range(num_layers) for p in PROJECTIONS if p in targets}
        if "lm_head" in targets:
            ranks[(-1, "lm_head")] = r
        return cls(ranks)

    @classmethod
    def from_peft_config(cls, peft_config: Any, num_layers: int) -> "LoraPlacement":
        """Resolve a ``peft.LoraConfig`` (original module names) with PEFT's own matching rules.

        ``target_modules`` (list or regex), ``layers_to_transform``, ``exclude_modules`` and ``rank_pattern`` are
        honoured through ``peft.tuners.tuners_utils.check_target_module_exists`` / ``peft.utils.other.get_pattern_key``;
        ``"all-linear"`` means the seven projections, as PEFT expands it for a causal LM (``lm_head`` excluded).
        """
        from peft.tuners.tuners_utils import check_target_module_exists
        from peft.utils.other import get_pattern_key

        if getattr(peft_config, "use_dora", False):
            raise ValueError("peft_config.use_dora: the FLOP count covers plain LoRA only, found use_dora=True")
        config = peft_config
        if getattr(peft_config, "target_modules", None) == "all-linear":
            import copy

            config = copy.copy(peft_config)
            config.target_modules = set(PROJECTIONS)
        r = peft_config.r
        rank_pattern = dict(getattr(peft_config, "rank_pattern", None) or {})
        ranks: dict[tuple[int, str], int] = {}
        keys = [(layer, p, _MODULE_PATH[p].format(layer=layer)) for layer in range(num_layers) for p in PROJECTIONS]
        for layer, p, key in [*keys, (-1, "lm_head", "lm_head")]:
            if check_target_module_exists(config, key):
                pattern = get_pattern_key(rank_pattern.keys(), key)
                ranks[(layer, p)] = rank_pattern.get(pattern, r)
        return cls(ranks)

    def rank(self, layer: int, name: str) -> int:
        return self.ranks.get((layer, name), 0)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step (forward + backward), by term; ``total`` is their sum."""

    base_forward: int  # frozen projections and lm_head
    base_input_grad: int  # their input gradients (no weight gradients: the weights are frozen)
    lora_forward: int
    lora_backward: int  # weight gradients of A and B, gradient of A's output, input gradient where needed
    attention_forward: int  # Q K^T and P V
    attention_backward: int  # dQ, dK, dP, dV where needed

    @property
    def forward(self) -> int:
        return self.base_forward + self.lora_forward + self.attention_forward

    @property
    def backward(self) -> int:
        return self.base_input_grad + self.lora_backward + self.attention_backward

    @property
    def matmul(self) -> int:
        """The linear layers' share (``aten.mm`` under ``FlopCounterMode``)."""
        return self.base_forward + self.base_input_grad + self.lora_forward + self.lora_backward

    @property
    def attention(self) -> int:
        """The attention share (``aten.bmm`` in eager attention)."""
        return self.attention_forward + self.attention_backward

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def scaled(self, factor: int) -> "StepFlops":
        return StepFlops(*(factor * v for v in vars(self).values()))


def train_step_flops(shape: DecoderShape, lora: LoraPlacement, batch_size: int, seq_len: int,
                     inputs_require_grad: bool = False) -> StepFlops:  # fmt: skip
    """FLOPs of forward + backward of ``batch_size`` sequences of ``seq_len`` tokens with a frozen base.

    ``inputs_require_grad``: the embedding output requires grad (``model.enable_input_require_grads()``, done for
    gradient checkpointing), so even the first layer computes the gradient of its inputs. Gradient-checkpointing
    recomputation itself is not counted (model FLOPs).
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, found {value!r}")
    tokens = batch_size * seq_len
    terms = dict.fromkeys(("base_forward", "base_input_grad", "lora_forward", "lora_backward",
                           "attention_forward", "attention_backward"), 0)  # fmt: skip

    def linear(layer: int, name: str, input_grad: bool) -> bool:
        """Count one (LoRA-wrapped) projection; return whether its output requires grad."""
        d_in, d_out = shape.projection_dims(name)
        terms["base_forward"] += 2 * tokens * d_in * d_out
        if input_grad:
            terms["base_input_grad"] += 2 * tokens * d_in * d_out
        r = lora.rank(layer, name)
        if r:
            terms["lora_forward"] += 2 * tokens * r * (d_in + d_out)
            # dA, dB, d(A x); and dx through A when x requires grad
            terms["lora_backward"] += 2 * tokens * r * (d_in + 2 * d_out) + (2 * tokens * r * d_in if input_grad else 0)
        return input_grad or r > 0

    # One (seq x seq x head_dim) product per query head and sequence; eager attention repeats the kv heads.
    attn_product = 2 * batch_size * shape.num_attention_heads * seq_len * seq_len * shape.head_dim
    grad = inputs_require_grad  # whether the residual stream requires grad
    for layer in range(shape.num_hidden_layers):
        q, k, v = (linear(layer, p, grad) for p in ("q_proj", "k_proj", "v_proj"))
        terms["attention_forward"] += 2 * attn_product
        scores = q or k
        # S = Q K^T: dQ = dS K, dK = dS^T Q.  O = P V: dP = dO V^T (P requires grad iff S does), dV = P^T dO.
        terms["attention_backward"] += attn_product * (q + k + scores + v)
        o = linear(layer, "o_proj", scores or v)
        grad = grad or o  # the residual stream after the attention block
        gate, up = (linear(layer, p, grad) for p in ("gate_proj", "up_proj"))
        down = linear(layer, "down_proj", gate or up)
        grad = grad or down
    linear(-1, "lm_head", grad)
    return StepFlops(**terms)


def model_step_flops(config: Any, peft_config: Any, batch_size: int, seq_len: int,
                     inputs_require_grad: bool = False) -> StepFlops:  # fmt: skip
    """``train_step_flops`` from a model config and a ``peft.LoraConfig`` in original module names."""
    shape = DecoderShape.from_config(config)
    return train_step_flops(shape, LoraPlacement.from_peft_config(peft_config, shape.num_hidden_layers),
                            batch_size, seq_len, inputs_require_grad)  # fmt: skip


def peak_flops(hardware: str, dtype: str) -> float:
    """Dense matmul peak of one NeuronCore in FLOP/s: ``hardware`` trn1|trn2, ``dtype`` bf16|fp32 (or torch names)."""
    key = (str(hardware).lower(), _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."), str(dtype)))
    if key not in PEAK_FLOPS_PER_CORE:
        known = sorted({h for h, _ in PEAK_FLOPS_PER_CORE})
        raise ValueError(f"peak_flops: expected hardware in {known} and dtype bf16|fp32, found {hardware!r}, {dtype!r}"
                         "; pass the peak FLOP/s per device explicitly for other hardware")  # fmt: skip
    return PEAK_FLOPS_PER_CORE[key]


@dataclass(frozen=True)
class Throughput:
    """Achieved FLOP/s over all devices and per device, and MFU when a peak is known (else None)."""

    flops_per_second: float
    flops_per_second_per_device: float
    mfu: float | None


def throughput(step_flops: float, step_seconds: float, num_devices: int,
               peak_per_device: float | None = None) -> Throughput:  # fmt: skip
    """MFU = achieved / peak, with ``step_flops`` for the whole global batch. ``peak_per_device=None`` (CPU, or an
    unknown accelerator): achieved FLOP/s only."""
    if not step_seconds > 0:
        raise ValueError(f"step_seconds: expected a positive duration, found {step_seconds!r}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices: expected a positive int, found {num_devices!r}")
    if peak_per_device is not None and not peak_per_device > 0:
        raise ValueError(f"peak_per_device: expected a positive FLOP/s figure or None, found {peak_per_device!r}")
    achieved = step_flops / step_seconds
    per_device = achieved / num_devices
    return Throughput(achieved, per_device, None if peak_per_device is None else per_device / peak_per_device)

