"""Worker for the ZeRO-1 tests: the same AdamW run sharded over data-parallel ranks and in one process.

Parameters of several sizes (so the greedy partition splits them unevenly) and fp32 gradients drawn from a fixed
seed per step, identical on every rank (what an all-reduce of data-parallel gradients produces), so that the only
difference between the runs is the sharding of the optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch

SHAPES = [(16, 8), (8,), (32, 4), (4, 16), (64,), (3, 3)]
DEFAULTS = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)


def make_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in SHAPES]


def set_grads(params: list[torch.Tensor], step: int, rank_offset: float = 0.0) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) + rank_offset


def plain_run(steps: int, state: dict | None = None, params: list[torch.Tensor] | None = None, start: int = 0):
    """Single-process AdamW; optionally resumed from (params, state) at step ``start``."""
    params = make_params() if params is None else [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, **DEFAULTS)
    if state is not None:
        opt.load_state_dict(state)
    for step in range(start, start + steps):
        set_grads(params, step)
        opt.step()
    return params, opt.state_dict()


def worker(rank: int, world_size: int) -> dict[str, Any]:
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel
    from optimum_neuron_peft.parallel.zero import (
        allreduce_data_parallel_gradients,
        full_optimizer_state_dict,
        load_full_optimizer_state_dict,
        make_zero1_optimizer,
    )

    initialize_model_parallel(1)  # tp = 1: every rank is a data-parallel replica
    try:
        out: dict[str, Any] = {}
        # the gradient all-reduce: rank r adds r to every gradient; the mean is the gradient + (world - 1) / 2
        params = make_params()
        set_grads(params, 0, rank_offset=float(rank))
        allreduce_data_parallel_gradients(params)
        out["reduced_grads"] = [p.grad.clone() for p in params]

        params = make_params()
        opt = make_zero1_optimizer(params, torch.optim.AdamW, **DEFAULTS)
        out["optimizer_type"] = type(opt).__name__
        for step in range(3):
            set_grads(params, step)
            opt.step()
        out["params_after_3"] = [p.detach().clone() for p in params]
        out["local_state_params"] = sorted(
            i for i, p in enumerate(params) if len(opt.optim.state.get(p, {})) > 0
        ) if hasattr(opt, "optim") else None
        out["state_after_3"] = full_optimizer_state_dict(opt)

        # resume at dp = world from a single-process state dict (another dp size)
        ref_params, ref_state = plain_run(3)
        params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
        opt = make_zero1_optimizer(params, torch.optim.AdamW, **DEFAULTS)
        load_full_optimizer_state_dict(opt, ref_state)
        for step in range(3, 5):
            set_grads(params, step)
            opt.step()
        out["resumed_params_after_5"] = [p.detach().clone() for p in params]
        return out
    finally:
        destroy_model_parallel()
