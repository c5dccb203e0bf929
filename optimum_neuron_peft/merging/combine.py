"""Combine consolidated LoRA adapters into one, with every combination type of PEFT's ``add_weighted_adapter``.

Types and how they relate to PEFT (see docs/merging.md):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B are combined separately with
  weights sqrt(|w * scaling|) (the sign on A), exactly as PEFT does (bit-exact). With several adapters this is NOT
  the weighted sum of the deltas (cross terms); use ``cat`` or ``svd`` for that.
- ``cat``: ranks concatenated, exact weighted sum of the deltas.
- ``svd``: the weighted sum of the deltas factored without materialising it (QR of the stacked factors and a small
  core SVD), truncated to ``svd_rank`` (default: max rank; pass the sum of ranks for an exact result).
- ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: prune/merge the full deltas (they
  have to be materialised for elementwise pruning), then SVD like PEFT.

Deviations from PEFT (bugs there): the combined adapter has ``use_rslora: false`` (its weights already carry every
scaling, its own scaling must be 1; PEFT keeps rsLoRA and scales the result by sqrt(r)); DARE at density 0 gives
zeros, not NaN.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import MergeError
from ..transformations.names import PEFT_WRAPPER_PREFIX
from ..utils.atomic import atomic_output_dir, check_output_dir
from .adapter_io import Adapter, load_adapter, natural_key, save_adapter
from . import kernels as mu
from .device import resolve_device
from .svd import dense_svd, lowrank_svd

SEPARATE_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*SEPARATE_TYPES, "cat", *SVD_TYPES)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _kernel(kind: str, density, sign_method: str, generator):
    """The merge_utils function for a combination type (its base name, without ``_svd``)."""
    table: dict[str, Callable] = {
        "linear": lambda ts, w: mu.task_arithmetic(ts, w),
        "svd": lambda ts, w: mu.task_arithmetic(ts, w),
        "ties": lambda ts, w: mu.ties(ts, w, density, sign_method),
        "dare_linear": lambda ts, w: mu.dare_linear(ts, w, density, generator=generator),
        "dare_ties": lambda ts, w: mu.dare_ties(ts, w, density, sign_method, generator=generator),
        "magnitude_prune": lambda ts, w: mu.magnitude_prune(ts, w, density),
    }
    return table.get(kind if kind == "svd" else kind.removesuffix("_svd"))


def _validate_arguments(adapter_dirs, weights, combination_type, density, majority_sign_method, svd_rank, svd_clamp):
    if len(adapter_dirs) == 0:
        raise MergeError("adapter_dirs: expected at least one adapter directory, found none")
    if len(weights) != len(adapter_dirs):
        raise MergeError(f"weights: expected {len(adapter_dirs)} values (one per adapter), found {len(weights)}")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise MergeError(f"weights: expected finite numbers, found {bad[0]!r}")
    if combination_type not in COMBINATION_TYPES:
        raise MergeError(f"combination_type: expected one of {', '.join(COMBINATION_TYPES)}; found {combination_type!r}")
    base = combination_type.removesuffix("_svd")
    if density is not None and (isinstance(density, bool) or not math.isfinite(density) or not 0 <= density <= 1):
        raise MergeError(f"density: expected a number in [0, 1], found {density!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not math.isfinite(svd_clamp)):
        raise MergeError(f"svd_clamp: expected a quantile in [0, 1], found {svd_clamp!r}")
    if base in _NEEDS_DENSITY and (density is None or isinstance(density, bool) or not 0 <= density <= 1):
        raise MergeError(f"density: combination type {combination_type!r} needs a density in [0, 1], found {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method: expected 'total' or 'frequency', found {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergeError(f"svd_rank: expected a positive integer, found {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise MergeError(f"svd_clamp: expected a quantile in [0, 1], found {svd_clamp!r}")


def _check_compatible(adapters: list[Adapter], combination_type: str) -> None:
    bases = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    if len(bases) > 1:
        listing = "; ".join(f"{a.path}: {a.config.get('base_model_name_or_path')!r}" for a in adapters)
        raise MergeError(f"adapters were trained on different base models (base_model_name_or_path): {listing}")
    if combination_type in SEPARATE_TYPES and len({a.max_rank for a in adapters}) > 1:
        listing = ", ".join(f"{a.path}: r={a.max_rank}" for a in adapters)
        raise MergeError(f"combination type {combination_type!r} needs adapters of equal rank, found {listing}; "
                         "use cat or an svd type for different ranks")
    kinds = {type(a.config.get("target_modules")) for a in adapters}
    if len(kinds) > 1:
        raise MergeError("target_modules: all adapter configs must use the same type (all lists or all regex strings)")
    for name in sorted({m for a in adapters for m in a.modules}, key=natural_key):
        present = [a for a in adapters if name in a.modules]
        in_dims = {a.modules[name].A.shape[1] for a in present}
        out_dims = {a.modules[name].B.shape[0] for a in present}
        if len(in_dims) > 1 or len(out_dims) > 1:
            listing = ", ".join(f"{a.path}: {tuple(a.modules[name].B.shape[:1] + a.modules[name].A.shape[1:])}"
                                for a in present)
            raise MergeError(f"module {name!r}: adapters disagree on the (out, in) shape: {listing}")
        if combination_type in SEPARATE_TYPES and len({a.modules[name].rank for a in present}) > 1:
            raise MergeError(f"module {name!r}: {combination_type!r} needs equal ranks, found "
                             + ", ".join(f"{a.path}: r={a.modules[name].rank}" for a in present))


def _new_rank(adapters: list[Adapter], combination_type: str, svd_rank: int | None) -> int:
    ranks = [a.max_rank for a in adapters]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD_TYPES:
        if svd_rank is not None:
            # The delta of a module (out, in) has rank at most min(out, in): a larger r only adds zeros.
            limit = min(min(m.B.shape[0], m.A.shape[1]) for a in adapters for m in a.modules.values())
            if svd_rank > limit:
                raise MergeError(f"svd_rank: expected at most {limit} (the smallest min(out, in) of the adapted "
                                 f"modules), found {svd_rank}")
        return svd_rank or max(ranks)
    return ranks[0]


def _new_config(adapters: list[Adapter], rank: int) -> dict:
    config = copy.deepcopy(adapters[0].config)
    targets = [a.config.get("target_modules") for a in adapters]
    if isinstance(targets[0], str):
        config["target_modules"] = "|".join(f"({t})" for t in targets)
    else:
        config["target_modules"] = sorted({t for ts in targets for t in (ts or [])})
    config.update(r=rank, lora_alpha=rank, alpha_pattern={}, rank_pattern={}, use_rslora=False)
    return config


def _delta(module, device) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` on CPU: half-precision factors are multiplied in float32, cast back."""
    A, B = module.A.to(device), module.B.to(device)
    cast = device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
    out = (B.float() @ A.float() if cast else B @ A) * module.scaling
    return out.to(B.dtype) if cast else out


def _combine_module(parts, combination_type, new_rank, kernel, svd_clamp, device):
    """Combined (A, B) for one module; ``parts`` are (weight, LoraModule) of the adapters that have it."""
    if combination_type == "cat":
        As = [m.A.to(device) * w * m.scaling for w, m in parts]
        Bs = [m.B.to(device) for _, m in parts]
        A, B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
        pad = new_rank - A.shape[0]
        return torch.cat([A, A.new_zeros(pad, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
    if combination_type == "svd" and svd_clamp is None:
        As = [m.A.to(device) * (w * m.scaling) for w, m in parts]
        return lowrank_svd(As, [m.B.to(device) for _, m in parts], new_rank)
    if combination_type in SVD_TYPES:
        deltas = [_delta(m, device) for _, m in parts]
        merged = kernel(deltas, torch.tensor([w for w, _ in parts]).to(device))
        # PEFT's full_matrices=True only matters for the signs seen by svd_clamp; skip its cost otherwise.
        return dense_svd(merged, new_rank, svd_clamp, full_matrices=svd_clamp is not None)
    signed = [w * m.scaling for w, m in parts]
    weights_A = torch.tensor([math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in signed]).to(device)
    weights_B = torch.tensor([math.sqrt(abs(s)) for s in signed]).to(device)
    dtype = parts[0][1].A.dtype
    A = kernel([m.A.to(device) for _, m in parts], weights_A)
    B = kernel([m.B.to(device) for _, m in parts], weights_B)
    return A.to(dtype), B.to(dtype)


def module_order_from_config(config_dir: str | Path) -> list[str]:
    """PEFT module names in the order of ``model.named_modules()`` for a Transformers config (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [PEFT_WRAPPER_PREFIX + name for name, _ in model.named_modules()]


def _ordered_modules(adapters: list[Adapter], module_order: Sequence[str] | None) -> list[str]:
    names = {m for a in adapters for m in a.modules}
    if module_order is None:
        base = adapters[0].config.get("base_model_name_or_path")
        if base and (Path(base) / "config.json").is_file():
            try:
                module_order = module_order_from_config(base)
            except Exception:  # noqa: BLE001 - an unknown architecture only changes the DARE draw order
                module_order = None
    rank = {name: i for i, name in enumerate(module_order or [])}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), natural_key(n)))


def combine_adapters(
    adapter_dirs: Sequence[str | Path],
    weights: Sequence[float],
    combination_type: str = "svd",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    output_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = "cpu",
    generator: torch.Generator | None = None,
    module_order: Sequence[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Combine LoRA adapters like PEFT's ``add_weighted_adapter``; write a PEFT adapter to ``output_dir`` if given.

    Returns ``(adapter_config, {module: (lora_A, lora_B)})``. DARE types draw from ``generator`` (default: torch's
    global generator, like PEFT) in PEFT's module order (``module_order``, default: the base model's when its
    config is on disk, else natural name order). ``progress(done, total, module)`` is called after each module.
    Nothing is written on error.
    """
    weights = [float(w) for w in weights]
    _validate_arguments(adapter_dirs, weights, combination_type, density, majority_sign_method, svd_rank, svd_clamp)
    if output_dir is not None:
        check_output_dir(output_dir, overwrite, inputs=adapter_dirs)
    dev = resolve_device(device)
    adapters = [load_adapter(d) for d in adapter_dirs]
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: a single adapter can only be scaled
    _check_compatible(adapters, combination_type)
    new_rank = _new_rank(adapters, combination_type, svd_rank)
    kernel = _kernel(combination_type, density, majority_sign_method, generator)
    names = _ordered_modules(adapters, module_order)
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, name in enumerate(names):
        parts = [(w, a.modules[name]) for w, a in zip(weights, adapters) if name in a.modules]
        try:
            A, B = _combine_module(parts, combination_type, new_rank, kernel, svd_clamp, dev)
        except torch.linalg.LinAlgError as err:  # e.g. an SVD of a delta that overflowed
            raise MergeError(f"module {name!r}: cannot combine ({' '.join(str(err).split())[:200]}); are the weights too large?") from None
        for factor in (A, B):
            if factor.is_floating_point() and not bool(torch.isfinite(factor).all()):
                raise MergeError(f"module {name!r}: the combined adapter is not finite (weights {weights} overflow {factor.dtype})")
        combined[name] = (A.cpu(), B.cpu())
        if progress is not None:
            progress(i + 1, len(names), name)
    config = _new_config(adapters, new_rank)
    if output_dir is not None:
        with atomic_output_dir(output_dir, overwrite, inputs=adapter_dirs) as tmp:
            save_adapter(tmp, config, combined)
    return config, combined
