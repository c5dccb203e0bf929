"""Building blocks of the Llama-family decoders: RMSNorm, rotary embeddings, attention masks, attention, MLP, layer.

The attention and MLP are `CustomModule`s: their weights differ from the Transformers layout, and the specs they
declare (`GQAQKVColumnParallelLinearSpec`, `FusedLinearsSpec`) say how. Which parallel layer each projection is
comes from the `ParallelPlan`; the code here only computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..errors import ConfigError
from ..parallel import TensorParallel, mark_sequence_parallel, reduce_gradient_in_backward
from ..transformations import CustomModule, ModelWeightTransformationSpecs
from .config import ArchitectureConfig
from .plan import ParallelPlan


class RMSNorm(nn.Module):
    """Transformers' LlamaRMSNorm: normalize in fp32, cast back, scale by ``weight``.

    ``sequence_parallel``: the input is a sequence shard of the group ``tp``, so the weight gradient is a partial
    sum, completed in backward over ``tp`` (and marked so that `allreduce_sequence_parallel_gradients` skips it).
    ``sum_grad_over``: the weight is applied to different heads on each rank (Qwen3's q/k norms); its gradient is
    summed over that group in backward.
    """

    def __init__(self, dim: int, eps: float, dtype=None, device=None, sequence_parallel: bool = False,
                 sum_grad_over: TensorParallel | None = None, tp: TensorParallel | None = None) -> None:  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps
        if sequence_parallel and sum_grad_over is not None:
            raise ConfigError("RMSNorm: sequence_parallel and sum_grad_over cannot both be set")
        self.sum_grad_over = sum_grad_over if not sequence_parallel else tp
        if sequence_parallel:
            mark_sequence_parallel(self.weight, reduced_in_backward=tp is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight
        if self.sum_grad_over is not None:
            weight = reduce_gradient_in_backward(weight, self.sum_grad_over)
        return weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos / sin tables of rotary position embeddings, with Transformers' rope types (default, linear, llama3, yarn).

    The inverse frequencies come from Transformers' own ``ROPE_INIT_FUNCTIONS`` so that scaled variants (Llama 3)
    are bit-identical. They are computed on the CPU even when the model is built on the "meta" device.
    """

    def __init__(self, hf_config: Any, config: ArchitectureConfig) -> None:
        super().__init__()
        if config.rope_type == "default":
            rope = getattr(hf_config, "rope_parameters", None) or {}
            base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            dim = config.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            scaling = 1.0
        elif config.rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[config.rope_type](hf_config, torch.device("cpu"))
        else:
            raise ConfigError(
                f"{config.model_type}: unknown rope_type {config.rope_type!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}"
            )
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = float(scaling)

    @torch.no_grad()
    def forward(self, seq_len: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` is (B, heads, S, hd), ``cos`` / ``sin`` (S, hd)."""
    return x * cos + rotate_half(x) * sin


def attention_masks(
    attention_mask: torch.Tensor | None, seq_len: int, windows: set[int | None], device: torch.device
) -> dict[int | None, torch.Tensor | None]:
    """Boolean (B or 1, 1, S, S) masks (True = attend) for each attention window, or None for plain causal.

    Like Transformers: causal, AND the key is not padding (``attention_mask`` 2-D, 1 = token), AND for a sliding
    window w the key is one of the w latest positions (``key > query - w``). A query with no visible key (left
    padding) gets an all-zero output from scaled_dot_product_attention, as in Transformers' sdpa path.
    """
    out: dict[int | None, torch.Tensor | None] = {}
    positions = torch.arange(seq_len, device=device)
    causal = positions[None, :] <= positions[:, None]  # (query, key)
    padding = None if attention_mask is None else attention_mask.to(device=device).bool()[:, None, None, :]
    for window in windows:
        if window is not None and window >= seq_len:
            window = None  # the window covers the whole sequence: plain causal attention
        if window is None and padding is None:
            out_mask = None
        else:
            mask = causal if window is None else causal & (positions[None, :] > positions[:, None] - window)
            out_mask = mask[None, None] if padding is None else mask[None, None] & padding
        out[window] = out_mask
    return out


def effective_window(window: int | None, seq_len: int) -> int | None:
    return None if window is None or window >= seq_len else window


class ParallelAttention(CustomModule, nn.Module):
    """GQA self-attention with a column-parallel QKV projection and a row-parallel output projection.

    Each rank computes its H/tp query heads against its K*m/tp key/value head slots; the checkpoint loader has
    already permuted the query heads (and o_proj columns) so that local query head i uses local slot i // share.
    """

    def __init__(self, config: ArchitectureConfig, plan: ParallelPlan, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.scaling = config.attention_scaling
        self.dropout = config.attention_dropout
        self.window = config.sliding_windows[layer_idx]
        self.qkv_proj, qkv_spec = plan.qkv_projection(config)
        self.o_proj = plan.output_projection(config)
        self.specs = ModelWeightTransformationSpecs(specs=[qkv_spec])
        local_q_heads = config.num_attention_heads // plan.tp.size
        local_kv_slots = self.qkv_proj.kv_size // self.head_dim
        self.groups = local_q_heads // local_kv_slots
        if config.qk_norm:  # Qwen3: per-head norms on head_dim, replicated; each rank normalizes its own heads
            factory = {"dtype": plan.dtype, "device": plan.device, "sum_grad_over": plan.tp}
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, **factory)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, **factory)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: dict) -> torch.Tensor:
        q, k, v = self.qkv_proj(x)  # (B, S, local heads * hd), full sequence even under sequence parallelism
        batch, seq = q.shape[:2]
        q, k, v = (t.view(batch, seq, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        mask = masks[effective_window(self.window, seq)]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scaling,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class ParallelMLP(CustomModule, nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) with gate and up fused into one column-parallel ``gate_up_proj``."""

    def __init__(self, config: ArchitectureConfig, plan: ParallelPlan) -> None:
        super().__init__()
        self.gate_up_proj, spec = plan.gate_up_projection(config)
        self.down_proj = plan.down_projection(config)
        self.specs = ModelWeightTransformationSpecs(specs=[spec])
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # local [gate_r | up_r]
        return self.down_proj(self.act_fn(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block; ``residual_multiplier`` scales both branches (Granite; 1.0 elsewhere)."""

    def __init__(self, config: ArchitectureConfig, plan: ParallelPlan, layer_idx: int) -> None:
        super().__init__()
        norm = {"dtype": plan.dtype, "device": plan.device, "sequence_parallel": plan.sequence_parallel, "tp": plan.tp}
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.self_attn = ParallelAttention(config, plan, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.mlp = ParallelMLP(config, plan)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: dict) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, masks)
        x = x + h * self.residual_multiplier if self.residual_multiplier != 1.0 else x + h
        h = self.mlp(self.post_attention_layernorm(x))
        return x + h * self.residual_multiplier if self.residual_multiplier != 1.0 else x + h
