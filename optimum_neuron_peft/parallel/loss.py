"""Cross entropy over vocabulary-parallel logits (the output of a column-parallel lm_head without gather).

Gathering (tokens, vocab) logits to every rank is the largest activation of a causal LM; instead each rank keeps
its vocab slice and three small all-reduces over (tokens,) tensors give the exact loss:

1. max of the logits (for a stable log-sum-exp; its gradient cancels, so it is treated as a constant),
2. the target logit (only the rank owning the target id contributes, others add 0),
3. the sum of exp(logit - max).

(2) and (3) travel in one all-reduce. The gradient w.r.t. the local logits is softmax - one_hot(target) restricted
to the local slice, computed in backward from the saved local softmax (no extra collective).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from . import collectives
from .state import TensorParallel, resolve_tp


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, tp: TensorParallel):
        x = logits.float()  # log-sum-exp in fp32 whatever the activation dtype
        vocab_local = x.shape[-1]
        start = tp.rank * vocab_local
        x = x - collectives.all_reduce_max(x.detach().amax(dim=-1), tp).unsqueeze(-1)
        outside = (target < start) | (target >= start + vocab_local)  # also true for ignore_index = -100
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = x.exp_()  # x is our own fp32 copy, so in place is safe and saves a (tokens, vocab/tp) buffer
        reduced = collectives.all_reduce_sum(torch.stack([target_logit, exp.sum(dim=-1)]), tp)
        target_logit, sum_exp = reduced[0], reduced[1]
        ignored = target == ignore_index
        loss = (torch.log(sum_exp) - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit)  # softmax - one_hot on the owning rank only
        scale = grad_loss.float().masked_fill(ignored, 0.0).unsqueeze(-1)
        return (grad * scale).to(ctx.logits_dtype), None, None, None


def parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    tp: TensorParallel | None = None,
) -> torch.Tensor:
    """Per-token cross entropy (reduction "none", fp32) of logits whose last dim is this rank's vocab slice.

    ``vocab_parallel_logits`` is (..., vocab/tp) with rank r holding ids [r*vocab/tp, (r+1)*vocab/tp);
    ``target`` is (...) with global ids. Tokens whose target is ``ignore_index`` get loss 0 and no gradient,
    like ``torch.nn.functional.cross_entropy(..., reduction="none")`` on the gathered logits.
    """
    tp = resolve_tp(tp)
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ConfigError(
            f"parallel_cross_entropy: target shape {tuple(target.shape)} must equal the logits shape without the "
            f"vocab dim, {tuple(vocab_parallel_logits.shape[:-1])}"
        )
    if target.dtype not in (torch.long, torch.int32, torch.int64):
        raise ConfigError(f"parallel_cross_entropy: target must hold integer ids, got dtype {target.dtype}")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target.long(), ignore_index, tp)
