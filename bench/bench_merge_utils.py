"""Side-by-side benchmark of optimum_neuron_peft.merge_utils and peft.utils.merge_utils.

Each measurement runs in a fresh subprocess: the task tensors are created, the current RSS is the baseline, the
merge runs once, and the extra peak memory is ``ru_maxrss - baseline`` (tracemalloc does not see torch memory).

    python bench/bench_merge_utils.py            # 4 x 4096x4096 fp32 and 4 x 4096x14336 bf16, density 0.2
    python bench/bench_merge_utils.py --repeat 3 --dtype float32   # median of 3 subprocesses, float32 rows only
    python bench/bench_merge_utils.py --quick    # small shapes, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = [((4096, 4096), "float32"), ((4096, 14336), "bfloat16")]
FUNCTIONS = ["ties", "dare_ties", "magnitude_prune"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(impl: str, function: str, shape: tuple[int, int], dtype_name: str, n: int, density: float) -> dict:
    import torch

    if impl == "peft":
        from peft.utils import merge_utils as mu
    else:
        from optimum_neuron_peft import merge_utils as mu
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    tensors = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1][:n] + [0.1] * max(0, n - 4))
    fn = getattr(mu, function)
    if impl == "ours" and function.startswith("dare"):
        from optimum_neuron_peft.merging import kernels

        kernels._fast_path_available(dtype)  # one-off self-check of the fast Bernoulli path, outside the timing
    baseline = _rss_bytes()
    torch.manual_seed(1)
    start = time.perf_counter()
    out = fn(tensors, weights, density)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inputs = sum(t.numel() * t.element_size() for t in tensors)
    return {"seconds": seconds, "extra_peak": peak - baseline, "inputs": inputs,
            "checksum": float(out.double().sum()), "nonzero": int((out != 0).sum())}


def measure(impl, function, shape, dtype, n, density) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, function, "x".join(map(str, shape)), dtype, str(n), str(density)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="subprocesses per measurement; the median is shown")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="only the cases of this dtype")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, function, shape, dtype, n, density = args.child
        print(json.dumps(child(impl, function, tuple(int(s) for s in shape.split("x")), dtype, int(n), float(density))))
        return
    cases = [((256, 512), "float32"), ((256, 896), "bfloat16")] if args.quick else CASES
    cases = [c for c in cases if args.dtype in (None, c[1])]
    print(f"{os.cpu_count()} cores; n={args.n} task tensors; density={args.density}; "
          f"median of {args.repeat} subprocess(es) per measurement")
    print("| function | tensors | PEFT s | ours s | speed-up | PEFT extra peak | ours extra peak | ratio | "
          "PEFT / ours extra (x inputs) | same checksum |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, dtype in cases:
        for function in FUNCTIONS:
            runs = {"peft": [], "ours": []}
            for _ in range(args.repeat):  # alternate, so that a noisy moment hits both
                for impl in runs:
                    runs[impl].append(measure(impl, function, shape, dtype, args.n, args.density))
            ref, ours = (sorted(runs[i], key=lambda r: r["seconds"])[args.repeat // 2] for i in ("peft", "ours"))
            if dtype == "float32" or function.startswith("dare"):  # magnitude ties in 16 bits may be cut elsewhere
                same = "yes" if ref["checksum"] == ours["checksum"] and ref["nonzero"] == ours["nonzero"] else "NO"
            else:
                same = "ties may differ"
            mb = 1 << 20
            print(f"| {function} | {args.n} x {shape[0]}x{shape[1]} {dtype} | {ref['seconds']:.2f} | "
                  f"{ours['seconds']:.2f} | {ref['seconds'] / ours['seconds']:.1f}x | "
                  f"{ref['extra_peak'] / mb:.0f} MiB | {ours['extra_peak'] / mb:.0f} MiB | "
                  f"{ours['extra_peak'] / max(ref['extra_peak'], 1):.2f} | "
                  f"{ref['extra_peak'] / ref['inputs']:.1f} / {ours['extra_peak'] / ours['inputs']:.1f} | "
                  f"{same} |", flush=True)


if __name__ == "__main__":
    main()
