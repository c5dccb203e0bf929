"""A small built-in language task the tiny model can learn in a few hundred LoRA steps.

Each sequence counts through a range of the vocabulary from a random start: "count up" steps +1 through tokens
2..32, "count down" steps -1 through tokens 33..63 (wrapping around inside its range). The next token is a
deterministic function of the previous one, so a random model starts near log(vocab) nats and a LoRA adapter
drives the loss towards the floor set by the unpredictable first token. The two tasks use disjoint tokens, so a
combination of both adapters (TIES) can serve both.
"""

from __future__ import annotations

import torch

# name -> (step, first token, number of tokens in the range)
TASKS = {"count_up": (1, 2, 31), "count_down": (-1, 33, 31)}


def make_batch(task: str, batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    step, first, span = TASKS[task]
    if first + span > vocab_size:
        raise ValueError(f"task {task!r} needs a vocabulary of at least {first + span} tokens, got {vocab_size}")
    start = torch.randint(0, span, (batch_size, 1), generator=generator)
    positions = torch.arange(seq_len).unsqueeze(0)
    return first + (start + step * positions) % span


def batches(task: str, steps: int, batch_size: int, seq_len: int, vocab_size: int, seed: int):
    """The same sequence of batches on every rank (same seed), so tensor-parallel ranks see identical data."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield make_batch(task, batch_size, seq_len, vocab_size, generator)
