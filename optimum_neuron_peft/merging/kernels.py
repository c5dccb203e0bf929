"""Task-tensor merging kernels with the same functions, signatures and results as ``peft.utils.merge_utils``.

Results equal PEFT's bit for bit on float32 inputs (signed zeros included); they are faster and use a fraction of
the memory because:

- magnitude pruning finds the k-th largest magnitude with numpy's introselect on the integer bit patterns of |x|
  (which order like the magnitudes; a radix select off CPU) instead of a full ``topk``, and keeps a tiny rule
  (threshold, tie cut-off) rather than a mask;
- DARE draws its Bernoulli masks from the same Mersenne Twister stream as ``torch.bernoulli`` (one 32-bit draw per
  element, in order), vectorised with numpy when a self-check proves the streams identical, else with
  ``torch.bernoulli`` itself; a large mask is cut into spans drawn by concurrent threads, each from the generator
  state jumped ahead to its first element (`utils.mt19937`), so the sequential stream uses every core;
- the stacked ``(n, ...)`` tensor is never built: the prune / elect sign / disjoint mean steps are replayed with
  PEFT's exact operations, element by element, on chunks small enough to stay in cache, each worker thread in its
  own preallocated scratch tensors; masks are 0/1 floats (bool comparisons do not vectorize on CPU). Each step is
  elementwise or a reduction over the task dimension, which we sum in torch's own order, so chunking does not
  change a single bit.

Ties in magnitude: for float32/float64 a tie at the threshold that must be broken falls back to ``torch.topk`` so
the kept elements are PEFT's; for float16/bfloat16 (where ties are common) the lowest flat indices are kept: the
kept count and every other element match PEFT, only the choice among equal magnitudes may differ.

Deviation: ``random_pruning(..., rescale=True)`` at density 0 returns zeros where PEFT divides 0 by 0 (NaN).
"""

from __future__ import annotations

import math
import struct
import warnings
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Literal, Sequence

import torch

from ..errors import MergeError

__all__ = [
    "reshape_weight_task_tensors",
    "magnitude_based_pruning",
    "random_pruning",
    "prune",
    "calculate_majority_sign_mask",
    "disjoint_merge",
    "task_arithmetic",
    "magnitude_prune",
    "ties",
    "dare_linear",
    "dare_ties",
]

# Elements per chunk for one task tensor; the stacked chunk holds n times that.
_CHUNK_ELEMENTS = 1 << 18
_MAJORITY_METHODS = ("total", "frequency")
_HALF = (torch.float16, torch.bfloat16)  # torch sums these in float32, rounding once


def _numpy():
    """numpy if importable (the CPU fast paths use it), else None."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with every torch wheel we support
        return None
    return numpy


def _chunks(numel: int, n_tasks: int = 1) -> list[tuple[int, int]]:
    size = max(1 << 14, _CHUNK_ELEMENTS // max(1, n_tasks))
    return [(s, min(s + size, numel)) for s in range(0, numel, size)] or [(0, 0)]


# --------------------------------------------------------------------------------------------------------------
# Magnitude rule: keep the k largest |x| (radix select on the bit patterns of |x|)
# --------------------------------------------------------------------------------------------------------------

_KEY_DTYPES = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}


def _magnitude_key(chunk: torch.Tensor) -> torch.Tensor:
    """Non-negative integers ordered exactly like ``chunk.abs()`` (NaN above inf, as ``topk`` ranks it)."""
    int_dtype, mask = _KEY_DTYPES[chunk.element_size()]
    return chunk.view(int_dtype).bitwise_and(mask)


def _kth_largest_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest value (k >= 1) and the number of values in higher buckets."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)))
    bucket = hist.numel() - 1 - j
    return bucket, int(from_top[j]) - int(hist[bucket])


class _MagnitudeRule:
    """Which flat elements ``magnitude_based_pruning`` keeps, computed without sorting.

    ``mode`` is ``none`` (k == 0), ``all``, ``ge`` (keep key >= t), ``cutoff`` (key > t, or key == t before flat
    index ``cutoff``) or ``mask`` (an explicit mask from ``torch.topk``, PEFT's own tie-breaking).
    """

    def __init__(self, flat: torch.Tensor, k: int):
        self.mode, self.threshold, self.cutoff, self.mask = "ge", 0, 0, None
        self.has_nan = True  # unless proven otherwise: "keep |x| > t" then needs the comparison path
        numel = flat.numel()
        if k <= 0:
            self.mode = "none"
        elif k >= numel:
            self.mode = "all"
        elif not flat.is_floating_point() or flat.element_size() not in _KEY_DTYPES:
            self._topk_mask(flat, k)
        elif flat.device.type == "cpu" and _numpy() is not None:
            self._partition_select(flat, k)
        else:
            self._radix_select(flat, k)

    def _topk_mask(self, flat: torch.Tensor, k: int) -> None:
        self.mode = "mask"
        self.mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        self.mask[torch.topk(flat.abs(), k=k, largest=True)[1]] = True

    def _partition_select(self, flat: torch.Tensor, k: int) -> None:
        """Exact k-th largest key with numpy's introselect (linear time, releases the GIL), in place on the keys."""
        np = _numpy()
        keys = _magnitude_key(flat).numpy()  # a fresh array: partitioned in place
        split = keys.size - k  # after partition: keys[split:] are the k largest, keys[:split] <= keys[split]
        keys.partition(split)
        threshold = int(keys[split])
        self.threshold = threshold
        equal_below = int(np.count_nonzero(keys[:split] == threshold))
        if equal_below == 0:  # exactly k keys >= threshold: they are topk's set
            return
        if flat.element_size() == 4:  # float32: ties are rare, reproduce PEFT's choice exactly
            self._topk_mask(flat, k)
            return
        self.has_nan = int(keys[split:].max()) > _magnitude_key(flat.new_tensor([math.inf])).item()
        self._cut_ties(flat, int(np.count_nonzero(keys[split:] == threshold)))

    def _cut_ties(self, flat: torch.Tensor, needed: int) -> None:
        """Keep key > threshold and the first ``needed`` flat positions with key == threshold."""
        self.mode = "cutoff"
        seen = 0
        for s, e in _chunks(flat.numel()):
            hits = (_magnitude_key(flat[s:e]) == self.threshold).nonzero().flatten()
            if seen + hits.numel() >= needed:
                self.cutoff = s + int(hits[needed - seen - 1]) + 1
                return
            seen += hits.numel()

    def _radix_select(self, flat: torch.Tensor, k: int) -> None:
        spans = _chunks(flat.numel())
        wide = flat.element_size() == 4
        shift = 16 if wide else 0
        hist = torch.zeros(1 << 15, dtype=torch.int64, device=flat.device)
        for s, e in spans:
            hist += torch.bincount((_magnitude_key(flat[s:e]) >> shift).int(), minlength=1 << 15)
        bucket, greater = _kth_largest_bucket(hist, k)
        threshold, equal = bucket, int(hist[bucket])
        if wide:
            low = torch.zeros(1 << 16, dtype=torch.int64, device=flat.device)
            for s, e in spans:
                key = _magnitude_key(flat[s:e])
                low += torch.bincount((key[(key >> 16) == bucket] & 0xFFFF).int(), minlength=1 << 16)
            low_bucket, low_greater = _kth_largest_bucket(low, k - greater)
            threshold, greater, equal = (bucket << 16) | low_bucket, greater + low_greater, int(low[low_bucket])
        self.threshold = threshold
        needed = k - greater
        if needed == equal:
            return
        if wide:  # float32: ties are rare, reproduce PEFT's choice exactly
            self._topk_mask(flat, k)
            return
        self._cut_ties(flat, needed)

    def multiplier(self, chunk: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """PEFT's mask on this chunk: 1 where kept, 0 elsewhere, in ``chunk.dtype``.

        With a normal threshold t, "keep |x| >= t" is ``clamp(sign(|x| - t) + 1, max=1)`` and "keep |x| > t" is
        ``clamp(sign(|x| - t), min=0)``: float arithmetic that vectorizes (comparisons to bool do not), exact because
        ``|x| - t`` is 0 only when ``|x| == t`` and otherwise has its sign; ``sign(NaN) == 0`` keeps NaN in the
        first form, as topk ranks NaN first (the threshold itself is never NaN here).
        """
        t = self._float_threshold(chunk.dtype) if self.mode in ("ge", "cutoff") else None
        if t is not None:
            end = start + chunk.numel()
            if self.mode == "ge" or end <= self.cutoff:  # keep |x| >= t
                return torch.abs(chunk, out=out).sub_(t).sign_().add_(1).clamp_(max=1)
            if start >= self.cutoff and not self.has_nan:  # keep |x| > t (sign(NaN - t) == 0 would drop NaN)
                return torch.abs(chunk, out=out).sub_(t).sign_().clamp_(min=0)
        return out.copy_(self.keep(chunk, start))

    def _float_threshold(self, dtype: torch.dtype) -> float | None:
        int_dtype, _ = _KEY_DTYPES[torch.empty((), dtype=dtype).element_size()]
        t = float(torch.tensor(self.threshold, dtype=int_dtype).view(dtype))
        # 0, or far from subnormals (where flush-to-zero could round a difference to 0); never NaN.
        return t if t == 0 or 2.0**-100 <= t <= math.inf else None

    def keep(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        end = start + chunk.numel()
        if self.mode == "none":
            return torch.zeros(chunk.shape, dtype=torch.bool, device=chunk.device)
        if self.mode == "all":
            return torch.ones(chunk.shape, dtype=torch.bool, device=chunk.device)
        if self.mode == "mask":
            return self.mask[start:end]
        key = _magnitude_key(chunk)
        if self.mode == "ge" or end <= self.cutoff:
            return key >= self.threshold
        if start >= self.cutoff:
            return key > self.threshold
        index = torch.arange(start, end, device=chunk.device)
        return (key > self.threshold) | ((key == self.threshold) & (index < self.cutoff))


# --------------------------------------------------------------------------------------------------------------
# Bernoulli masks drawn exactly like torch.bernoulli(torch.full_like(x, density)) on CPU
# --------------------------------------------------------------------------------------------------------------

_MT_N = 624
_STATE_HEADER = struct.Struct("<QiiQ")  # the_initial_seed, left, seeded, next; then uint64 state[624]
_fast_bernoulli_ok: dict[torch.dtype, bool] = {}
_MIN_DRAWS_PER_THREAD = 1 << 23
_DRAW_CHUNK = 1 << 20  # draws per numpy call: 4 MiB of uint32 scratch per thread


def _torch_bernoulli(numel: int, dtype: torch.dtype, density: float, generator, device) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.bool, device=device)
    spans = _chunks(numel) if torch.device(device).type == "cpu" else [(0, numel)]
    for s, e in spans:  # the CPU kernel draws one number per element, in order: chunking keeps the stream
        p = torch.full((e - s,), density, dtype=dtype, device=device)
        out[s:e] = torch.bernoulli(p, generator=generator).bool()
    return out


def _mt_state(generator: torch.Generator):
    """(raw torch state, header fields, numpy key, numpy pos) of a CPU generator."""
    import numpy as np

    raw = generator.get_state()
    header = _STATE_HEADER.unpack_from(raw.numpy(), 0)
    key = raw[_STATE_HEADER.size : _STATE_HEADER.size + 8 * _MT_N].numpy().view(np.uint64).astype(np.uint32)
    return raw, header, key, _MT_N if header[1] == 1 else header[3]  # left == 1: twist before the next draw


def _set_mt_state(generator: torch.Generator, raw: torch.Tensor, header, key, pos: int) -> None:
    import numpy as np

    new_raw = raw.clone()
    buf = new_raw.numpy()
    _STATE_HEADER.pack_into(buf, 0, header[0], _MT_N + 1 - pos, header[2], pos)
    buf[_STATE_HEADER.size : _STATE_HEADER.size + 8 * _MT_N] = np.asarray(key, dtype=np.uint32).astype(np.uint64).view(np.uint8)
    generator.set_state(new_raw)


def _draw_spans(numel: int) -> list[tuple[int, int]]:
    """Split the draws over the intra-op threads when each part is worth a jump-ahead (~0.05 s = ~7M draws)."""
    parts = max(1, min(torch.get_num_threads(), numel // _MIN_DRAWS_PER_THREAD))
    bounds = [numel * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _numpy_bernoulli(
    numel: int, dtype: torch.dtype, density: float, generator: torch.Generator, spans: list[tuple[int, int]] | None = None
) -> torch.Tensor:
    """Same stream as the CPU bernoulli kernel: draw r (mt19937), keep iff (r & 2^24-1) * 2^-24 < float(p).

    The stream is cut into ``spans`` drawn by concurrent threads (numpy releases the GIL while drawing), each
    started from the state jumped ahead to its first draw (`mt19937.jumped`); the generator ends in the state
    after the last span, as after ``torch.bernoulli``."""
    import numpy as np

    from ..utils import mt19937

    raw, header, key, pos = _mt_state(generator)
    limit = math.ceil(float(torch.tensor(density, dtype=dtype).float()) * (1 << 24))
    out = torch.empty(numel, dtype=torch.bool)
    out_np = out.numpy()
    spans = spans if spans is not None else _draw_spans(numel)

    def draw(span: tuple[int, int], key, pos) -> dict:
        bit_gen = mt19937.bit_generator(key, pos)
        draws = np.random.Generator(bit_gen)
        for s in range(span[0], span[1], _DRAW_CHUNK):
            e = min(s + _DRAW_CHUNK, span[1])
            r = draws.integers(0, 1 << 32, size=e - s, dtype=np.uint32)
            np.less(np.bitwise_and(r, 0xFFFFFF, out=r), limit, out=out_np[s:e])
        return bit_gen.state["state"]

    if len(spans) <= 1:
        state = draw((0, numel), key, pos)
    else:
        with ThreadPoolExecutor(len(spans)) as pool:
            futures = [pool.submit(draw, spans[0], key, pos)]
            for span in spans[1:]:  # each jump is computed while the earlier spans are being drawn
                futures.append(pool.submit(draw, span, *mt19937.jumped(key, pos, span[0])))
            state = [f.result() for f in futures][-1]
    _set_mt_state(generator, raw, header, state["key"], int(state["pos"]))
    return out


def _fast_path_available(dtype: torch.dtype) -> bool:
    """Check once per dtype that the numpy stream reproduces torch.bernoulli and the generator state after it."""
    if dtype not in _fast_bernoulli_ok:
        ok = False
        try:
            import numpy  # noqa: F401

            # one stream drawn whole, one cut in two spans (the second from a jumped-ahead state)
            for density, spans in ((0.2, None), (0.73, [(0, 700), (700, 2000)])):
                g1, g2 = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
                torch.rand(5, generator=g1), torch.rand(5, generator=g2)
                ok_ref = torch.bernoulli(torch.full((2000,), density, dtype=dtype), generator=g1).bool()
                ok_fast = _numpy_bernoulli(2000, dtype, density, g2, spans)
                ok = bool(torch.equal(ok_ref, ok_fast)) and torch.equal(
                    torch.rand(700, generator=g1), torch.rand(700, generator=g2)
                )
                if not ok:
                    break
        except Exception:  # noqa: BLE001 - any failure means: use torch.bernoulli
            ok = False
        _fast_bernoulli_ok[dtype] = ok
    return _fast_bernoulli_ok[dtype]


def _bernoulli_masks(tensors: Sequence[torch.Tensor], density: float, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Flat bool masks equal to ``torch.bernoulli(torch.full_like(t, density), generator=generator) == 1`` for each
    tensor in turn. One stream: the numpy path draws all of them at once, so one set of spans covers every tensor."""
    first = tensors[0]
    if first.device.type == "cpu":
        generator = generator if generator is not None else torch.default_generator
        if (
            all(t.dtype == first.dtype and t.device == first.device for t in tensors)
            and first.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and _fast_path_available(first.dtype)
        ):
            drawn = _numpy_bernoulli(sum(t.numel() for t in tensors), first.dtype, density, generator)
            return list(drawn.split([t.numel() for t in tensors]))
    return [_torch_bernoulli(t.numel(), t.dtype, density, generator, t.device) for t in tensors]


# --------------------------------------------------------------------------------------------------------------
# Public PEFT-compatible functions
# --------------------------------------------------------------------------------------------------------------


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """View ``weights`` (n,) as (n, 1, ..., 1) to broadcast over the stacked ``task_tensors`` (n, ...)."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude values of ``tensor``."""
    flat = tensor.reshape(-1)
    rule = _MagnitudeRule(flat, int(density * tensor.numel()))
    out = torch.empty_like(flat)
    for s, e in _chunks(flat.numel()):
        torch.mul(flat[s:e], rule.keep(flat[s:e], s), out=out[s:e])
    return out.view(tensor.shape)


def random_pruning(
    tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each value with probability ``density`` (the masks of PEFT for the same random state)."""
    (mask,) = _bernoulli_masks([tensor], density, generator)
    mask = mask.view(tensor.shape)
    pruned = tensor * mask
    if rescale and density > 0:
        pruned = pruned / density
    return pruned


def _check_density(density: float) -> bool:
    """True when pruning applies; warns like PEFT when density >= 1."""
    if density is None or isinstance(density, bool) or not isinstance(density, (int, float)):
        raise MergeError(f"density: expected a number in [0, 1], found {density!r}")
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return False
    if density < 0:
        raise MergeError(f"density: expected a number in [0, 1], found {density}")
    return True


def prune(
    tensor: torch.Tensor,
    density: float,
    method: Literal["magnitude", "random"],
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prune ``tensor`` by magnitude or at random, keeping a fraction ``density`` of its values."""
    if method not in ("magnitude", "random"):
        raise MergeError(f"method: expected 'magnitude' or 'random', found {method!r}")
    if not _check_density(density):
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale=rescale, generator=generator)


def _check_sign_method(method: str) -> None:
    if method not in _MAJORITY_METHODS:
        raise MergeError(f"majority_sign_method: expected one of {_MAJORITY_METHODS}, found {method!r}")


def _elect(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def calculate_majority_sign_mask(
    tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """Mask of the entries of the stacked ``tensor`` (n, ...) whose sign is the elected (majority) sign."""
    _check_sign_method(method)
    flat = tensor.reshape(tensor.shape[0], -1)
    out = torch.empty(flat.shape, dtype=torch.bool, device=tensor.device)
    for s, e in _chunks(flat.shape[1], flat.shape[0]):
        out[:, s:e] = _elect(flat[:, s:e], method)
    return out.view(tensor.shape)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the task dimension of the entries selected by ``majority_sign_mask``."""
    flat = task_tensors.reshape(task_tensors.shape[0], -1)
    mask = majority_sign_mask.reshape(flat.shape)
    return _run_chunked(flat.shape[1], flat.shape[0], lambda s, e: _disjoint(flat[:, s:e], mask[:, s:e])).view(
        task_tensors.shape[1:]
    )


def _run_chunked(numel: int, n_tasks: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``compute`` every chunk into one flat output; on CPU, chunks go to single-threaded workers.

    Independent single-threaded chunks avoid one OpenMP barrier per small op, which costs a lot on a busy machine.
    """
    spans = _chunks(numel, n_tasks)
    first = compute(*spans[0])
    out = torch.empty(numel, dtype=first.dtype, device=first.device)
    out[spans[0][0] : spans[0][1]] = first
    workers = torch.get_num_threads()
    if first.device.type != "cpu" or workers <= 1 or len(spans) < 3:
        for s, e in spans[1:]:
            out[s:e] = compute(s, e)
        return out

    def job(span: tuple[int, int]) -> None:
        torch.set_num_threads(1)  # per worker thread; the caller's setting is unchanged
        out[span[0] : span[1]] = compute(*span)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(job, spans[1:]))
    return out


def _as_weights(task_tensors: Sequence[torch.Tensor], weights) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor):
        weights = torch.tensor(list(weights))
    if weights.dim() != 1 or weights.numel() != len(task_tensors):
        raise MergeError(
            f"weights: expected a 1-D tensor of {len(task_tensors)} values (one per task tensor), "
            f"found shape {tuple(weights.shape)}"
        )
    return weights.view(-1, 1)


def _flat_tasks(task_tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(task_tensors) == 0:
        raise MergeError("task_tensors: expected at least one tensor, found none")
    shapes = {tuple(t.shape) for t in task_tensors}
    if len(shapes) != 1:
        raise MergeError(f"task_tensors: expected tensors of one shape, found shapes {sorted(shapes)}")
    return [t.reshape(-1) for t in task_tensors]


class _Workspace:
    """Scratch tensors of one worker thread for one merge: the chunk loop then allocates nothing.

    Allocating and freeing a few hundred KiB per op costs more than the op (the pages fault in again each time).
    """

    def __init__(self, n: int, size: int, dtype: torch.dtype, wide: torch.dtype, device):
        half = dtype in _HALF
        self.rows = torch.empty(n, size, dtype=dtype, device=device)  # pruned task values (PEFT's stacked rows)
        self.wide_rows = torch.empty(n, size, dtype=wide, device=device) if wide != dtype else self.rows
        self.signs = torch.empty(n, size, dtype=wide, device=device)
        self.total = torch.empty(size, dtype=torch.float32 if half else dtype, device=device)
        self.magnitude = torch.empty(size, dtype=dtype, device=device) if half else self.total
        self.weighted = torch.empty(size, dtype=wide, device=device)
        self.mixed = torch.empty(size, dtype=torch.float32 if wide in _HALF else wide, device=device)
        self.count = torch.empty(size, dtype=wide, device=device)


def _disjoint_mean(ws: _Workspace, rows: torch.Tensor, w: torch.Tensor, method: str | None) -> torch.Tensor:
    """PEFT's weighted sum (``method`` None) or elect sign + weighted disjoint mean on one chunk ``rows`` (n, l).

    The same elementwise operations as PEFT in the same order, element by element. Sums over the tasks go like
    torch's reduction of the stacked tensor: from +0 (-0 + -0 is -0, 0 + -0 + -0 is +0), one row after the other, in
    float32 for float16/bfloat16, rounded once; except in the tail of lengths that are not a multiple of 64 with five
    tasks or more, where torch uses another order and so do we (the stacked expressions).
    """
    n, l = rows.shape
    if n > 4 and l % 64:
        return _disjoint_mean_stacked(rows, w, method)
    wide_rows = ws.wide_rows[:, :l]
    if wide_rows.data_ptr() != rows.data_ptr():
        wide_rows.copy_(rows)  # float16/bfloat16 widened once (exact): mixed-dtype ops are slow
    weighted, mixed = ws.weighted[:l], ws.mixed[:l]
    if method is None:
        for i in range(n):
            _accumulate(mixed, torch.mul(wide_rows[i], w[i], out=weighted), first=i == 0)
        return mixed.to(weighted.dtype, copy=True)
    signs = ws.signs[:, :l]
    torch.sign(wide_rows, out=signs)
    if method == "total":  # the sum of the rows in their own dtype (float32 accumulation for float16/bfloat16)
        total = ws.total[:l]
        for i in range(n):
            _accumulate(total, rows[i], first=i == 0)
        magnitude = ws.magnitude[:l]
        if magnitude.data_ptr() != total.data_ptr():
            magnitude.copy_(total)  # rounded once to float16/bfloat16, like torch's sum
    else:  # small integers: exact in any order or dtype
        magnitude = ws.count[:l]
        torch.sum(signs, dim=0, out=magnitude)
    # where(magnitude >= 0, 1, -1) and the masks sign == majority as float arithmetic: bool ops do not vectorize.
    majority = ws.weighted[:l]
    majority.copy_(magnitude.sign_().add_(0.5).sign_())
    selected = signs.mul_(majority).clamp_(min=0).add_(0.0)  # 1 or +0 (adding +0 turns -0 into +0)
    count = ws.count[:l]
    torch.sum(selected, dim=0, out=count)
    for i in range(n):
        _accumulate(mixed, torch.mul(wide_rows[i], w[i], out=weighted).mul_(selected[i]), first=i == 0)
    return mixed.to(weighted.dtype) / torch.clamp(count, min=1.0).to(torch.get_default_dtype())


def _accumulate(total: torch.Tensor, row: torch.Tensor, first: bool) -> None:
    """``total += row``, starting from +0 when ``first``."""
    if first:
        total.copy_(row)
        total.add_(0.0)
    else:
        total.add_(row)


def _disjoint_mean_stacked(stacked: torch.Tensor, w: torch.Tensor, method: str | None) -> torch.Tensor:
    """PEFT's own expressions on a stacked chunk (five tasks or more on a length torch reduces in another order)."""
    if method is None:
        return (stacked * w).sum(dim=0)
    return _disjoint(stacked * w, _elect(stacked, method))


def _merge(
    task_tensors: Sequence[torch.Tensor],
    weights,
    pruner: Callable[[list[torch.Tensor]], list[Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]]] | None,
    majority_sign_method: str | None,
) -> torch.Tensor:
    """Prune each task tensor, weight, then sum (``majority_sign_method`` None) or take the disjoint mean."""
    flats = _flat_tasks(task_tensors)
    w = _as_weights(task_tensors, weights)
    prune_chunk = pruner(flats) if pruner is not None else None
    n, numel, dtype, device = len(flats), flats[0].numel(), flats[0].dtype, flats[0].device
    size = max((e - s for s, e in _chunks(numel, n)), default=0)
    wide = torch.promote_types(dtype, w.dtype)
    spaces: dict[int, _Workspace] = {}

    def compute(s: int, e: int) -> torch.Tensor:
        ws = spaces.get(threading.get_ident())
        if ws is None:
            ws = spaces[threading.get_ident()] = _Workspace(n, size, dtype, wide, device)
        rows = ws.rows[:, : e - s]
        for i, f in enumerate(flats):
            if prune_chunk is None:
                rows[i].copy_(f[s:e])
            else:
                prune_chunk[i](f[s:e], s, rows[i])
        return _disjoint_mean(ws, rows, w, majority_sign_method)

    return _run_chunked(numel, n, compute).view(task_tensors[0].shape)


def _magnitude_pruner(density: float):
    if not _check_density(density):
        return None

    def make(flat: torch.Tensor):
        rule = _MagnitudeRule(flat, int(density * flat.numel()))
        return lambda chunk, start, out: torch.mul(chunk, rule.multiplier(chunk, start, out), out=out)

    return lambda flats: [make(flat) for flat in flats]


def _random_pruner(density: float, generator: torch.Generator | None):
    if not _check_density(density):
        return None

    def make(mask: torch.Tensor):
        mask = mask.view(torch.uint8)  # uint8 -> float vectorizes

        def pruned(chunk: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
            out.copy_(mask[start : start + chunk.numel()])
            out.mul_(chunk)  # chunk * mask: the same product
            return out.div_(density) if density != 0 else out

        return pruned

    # Every mask first, task after task: the random stream consumed in PEFT's order.
    return lambda flats: [make(mask) for mask in _bernoulli_masks(flats, density, generator)]


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the task tensors."""
    return _merge(task_tensors, weights, None, None)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude-prune each task tensor, then take the weighted sum."""
    return _merge(task_tensors, weights, _magnitude_pruner(density), None)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """TIES: magnitude-prune, elect the majority sign, weighted disjoint mean."""
    _check_sign_method(majority_sign_method)
    return _merge(task_tensors, weights, _magnitude_pruner(density), majority_sign_method)


def dare_linear(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: random-prune with rescaling, then take the weighted sum."""
    return _merge(task_tensors, weights, _random_pruner(density, generator), None)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE-TIES: random-prune with rescaling, elect the majority sign, weighted disjoint mean."""
    _check_sign_method(majority_sign_method)
    return _merge(task_tensors, weights, _random_pruner(density, generator), majority_sign_method)
