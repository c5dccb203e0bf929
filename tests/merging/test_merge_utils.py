"""merge_utils kernels against PEFT's own ``peft.utils.merge_utils``."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils as ref

from optimum_neuron_peft import merge_utils as ours
from optimum_neuron_peft.errors import MergeError
from optimum_neuron_peft.merging import kernels

EXACT = dict(rtol=0, atol=0)


def _tasks(n, shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Several chunks even on small tensors, so the chunked replay is what gets tested; 960 is a multiple of 64 (the
    # row-by-row sums) that is not a power of two, and most tensors end in a shorter chunk.
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 1 << 16)
    monkeypatch.setattr(kernels, "_chunks", lambda numel, n=1: [(s, min(s + 960, numel)) for s in range(0, numel, 960)]
                        or [(0, 0)])


@pytest.mark.parametrize("shape", [(64, 48), (3, 5, 7), (1000,)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 0.999, 1.0])
def test_magnitude_based_pruning_float32_bit_exact(shape, density):
    x = _tasks(1, shape)[0]
    if density >= 1:
        return
    torch.testing.assert_close(ours.magnitude_based_pruning(x, density), ref.magnitude_based_pruning(x, density), **EXACT)


def test_magnitude_ties_float32_use_peft_choice():
    x = torch.tensor([3.0, -1.0, 1.0, 2.0, -1.0, 1.0, 0.5, -3.0])  # 5 kept of which 2 among the four |x| == 1
    torch.testing.assert_close(ours.magnitude_based_pruning(x, 0.625), ref.magnitude_based_pruning(x, 0.625), **EXACT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_magnitude_half_ties_same_count_and_rest(dtype):
    x = _tasks(1, (97, 31), dtype)[0]
    got, want = ours.magnitude_based_pruning(x, 0.3), ref.magnitude_based_pruning(x, 0.3)
    assert int((got != 0).sum()) == int((want != 0).sum())  # no exact zeros in randn
    threshold = x.abs().reshape(-1).topk(int(0.3 * x.numel())).values[-1]
    differ = got != want
    if dtype == torch.bfloat16:  # ties at the threshold at this size: the tie path is exercised
        assert kernels._MagnitudeRule(x.reshape(-1), int(0.3 * x.numel())).mode == "cutoff"
    assert bool((x.abs()[differ] == threshold).all())


@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_deterministic_merges_bit_exact(name, n):
    xs = _tasks(n, (50, 33), seed=n)
    w = torch.linspace(-0.7, 1.3, n)
    args = () if name == "task_arithmetic" else (0.4,)
    torch.testing.assert_close(getattr(ours, name)(xs, w, *args), getattr(ref, name)(xs, w, *args), **EXACT)


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_methods_and_dtypes(method, dtype):
    xs = _tasks(3, (40, 20), dtype, seed=3)
    w = torch.tensor([0.5, -1.0, 2.0])
    got, want = ours.ties(xs, w, 0.5, method), ref.ties(xs, w, 0.5, method)
    assert got.dtype == want.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **EXACT)
    else:  # bf16: magnitude ties may be broken differently; no ties at density 1
        torch.testing.assert_close(ours.ties(xs, w, 1.0, method), ref.ties(xs, w, 1.0, method), **EXACT)


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1, 15, 64, 1000, 1024, 4101])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 7])
def test_sums_over_tasks_like_peft(n, length, dtype, wdtype):
    # Rows of very different scales: any change in the order or precision of the sums shows.
    g = torch.Generator().manual_seed(n * length)
    xs = [(torch.randn(length, generator=g) * 2.0 ** (4 * i - 2 * n)).to(dtype) for i in range(n)]
    w = torch.linspace(1.5, -0.5, n).to(wdtype)
    torch.testing.assert_close(ours.task_arithmetic(xs, w), ref.task_arithmetic(xs, w), **EXACT)
    for method in ("total", "frequency"):  # density 1: no pruning, so no magnitude ties in 16 bits
        torch.testing.assert_close(ours.ties(xs, w, 1.0, method), ref.ties(xs, w, 1.0, method), **EXACT)


@pytest.mark.parametrize("name", ["magnitude_prune", "ties", "task_arithmetic"])
@pytest.mark.parametrize("shape", [(64, 48), (96, 40)])
def test_five_tasks_bit_exact(name, shape):
    xs = _tasks(5, shape, seed=11)
    w = torch.tensor([0.4, -0.3, 0.2, 0.1, 0.7])
    args = () if name == "task_arithmetic" else (0.3,)
    torch.testing.assert_close(getattr(ours, name)(xs, w, *args), getattr(ref, name)(xs, w, *args), **EXACT)


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "dare_ties"])
def test_special_values_like_peft(name, method):
    xs = _tasks(3, (40, 48), seed=5)
    xs[0][0, :6] = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, 1e-39, -1e-39])
    xs[1][0, :6] = torch.tensor([-float("inf"), 3.0, -0.0, -0.0, -1e-39, 1e-39])
    xs[2][0, :6] = torch.tensor([1.0, float("nan"), -0.0, 2.0, 0.0, -0.0])
    xs[1][3, :] = -0.0
    w = torch.tensor([0.5, -1.0, 2.0])
    args = (0.6,) if name == "magnitude_prune" else (0.6, method)
    torch.manual_seed(3)
    want = getattr(ref, name)(xs, w, *args)
    torch.manual_seed(3)
    got = getattr(ours, name)(xs, w, *args)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    numbers = ~want.isnan()
    assert torch.equal(torch.signbit(got[numbers]), torch.signbit(want[numbers]))  # signed zeros too


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_sign_mask_and_disjoint_merge(method):
    stacked = torch.stack(_tasks(4, (30, 17), seed=9))
    stacked[:, 0, :4] = 0  # zero columns: sign 0 is never the elected sign
    mask = ours.calculate_majority_sign_mask(stacked, method)
    torch.testing.assert_close(mask, ref.calculate_majority_sign_mask(stacked, method), **EXACT)
    torch.testing.assert_close(ours.disjoint_merge(stacked, mask), ref.disjoint_merge(stacked, mask), **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_draws_peft_masks_and_leaves_same_rng_state(dtype, name):
    xs = _tasks(3, (45, 29), dtype, seed=4)
    w = torch.tensor([0.3, 0.9, -0.4])
    torch.manual_seed(77)
    want, after_ref = getattr(ref, name)(xs, w, 0.3), torch.rand(5)
    torch.manual_seed(77)
    got, after_ours = getattr(ours, name)(xs, w, 0.3), torch.rand(5)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(after_ours, after_ref, **EXACT)


def test_random_pruning_with_generator_matches_global_stream():
    x = _tasks(1, (128, 64))[0]
    torch.manual_seed(5)
    want = ref.random_pruning(x, 0.25, rescale=True)
    got = ours.random_pruning(x, 0.25, rescale=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, **EXACT)


def test_dare_density_zero_gives_zeros_not_nan():
    xs = _tasks(2, (8, 8))
    out = ours.dare_linear(xs, torch.tensor([1.0, 1.0]), 0.0)
    assert torch.equal(out, torch.zeros(8, 8))


def test_bad_arguments():
    xs = _tasks(2, (4, 4))
    with pytest.raises(MergeError, match="density"):
        ours.prune(xs[0], -0.1, "magnitude")
    with pytest.raises(MergeError, match="method"):
        ours.prune(xs[0], 0.5, "bogus")
    with pytest.raises(MergeError, match="majority_sign_method"):
        ours.ties(xs, torch.ones(2), 0.5, "median")
    with pytest.raises(MergeError, match="weights"):
        ours.task_arithmetic(xs, torch.ones(3))
    with pytest.raises(MergeError, match="shape"):
        ours.task_arithmetic([xs[0], torch.ones(2, 2)], torch.ones(2))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 40), n=st.integers(1, 4),
    density=st.floats(0.0, 0.99), seed=st.integers(0, 2**16), method=st.sampled_from(["total", "frequency"]),
)
def test_property_ties_and_magnitude_prune_float32(rows, cols, n, density, seed, method):
    xs = _tasks(n, (rows, cols), seed=seed)
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    torch.testing.assert_close(ours.ties(xs, w, density, method), ref.ties(xs, w, density, method), **EXACT)
    torch.testing.assert_close(ours.magnitude_prune(xs, w, density), ref.magnitude_prune(xs, w, density), **EXACT)


@settings(max_examples=20, deadline=None)
@given(numel=st.integers(1, 3000), density=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_property_half_magnitude_kept_count(numel, density, dtype, seed):
    # Integers in a small range: many exact ties at the threshold.
    x = (torch.randint(-20, 21, (numel,), generator=torch.Generator().manual_seed(seed)) / 4).to(dtype)
    got, want = ours.magnitude_based_pruning(x, density), ref.magnitude_based_pruning(x, density)
    kept = kernels._MagnitudeRule(x, int(density * numel))
    n_kept = sum(int(kept.keep(x[s:s + 500], s).sum()) for s in range(0, numel, 500))
    assert n_kept == int(density * numel)
    torch.testing.assert_close(got.abs().sort().values, want.abs().sort().values, **EXACT)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_masks_drawn_in_parallel_spans_are_peft_masks(monkeypatch, name):
    # Uneven spans, each past the first drawn from a jumped-ahead state by its own thread.
    monkeypatch.setattr(kernels, "_draw_spans", lambda numel: [(0, numel // 5), (numel // 5, numel // 2), (numel // 2, numel)])
    xs = _tasks(3, (97, 61), torch.bfloat16, seed=8)
    w = torch.tensor([0.5, -0.2, 0.7])
    torch.manual_seed(123)
    want, after_ref = getattr(ref, name)(xs, w, 0.4), torch.rand(5)
    g = torch.Generator().manual_seed(123)
    got, after_ours = getattr(ours, name)(xs, w, 0.4, generator=g), torch.rand(5, generator=g)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(after_ours, after_ref, **EXACT)


def test_draw_spans_cover_the_stream_once():
    for numel in (0, 5, kernels._MIN_DRAWS_PER_THREAD * 3 + 7):
        spans = kernels._draw_spans(numel)
        assert spans[0][0] == 0 and spans[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_public_name_is_the_kernels_module():
    # `optimum_neuron_peft.merge_utils` stays the public name of `merging.kernels`
    assert set(ours.__all__) == set(kernels.__all__)
    assert all(getattr(ours, name) is getattr(kernels, name) for name in kernels.__all__)
