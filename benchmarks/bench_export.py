"""save_compressed / load_compressed against their targets (issue 11 section 2).

Per case, in one run: the file's bytes against the bound ``header + codebooks + raw
leaves + tables + order-0 entropy of every stream`` (``compression_report(q).entropy_bytes``,
computed from the streams' own symbol counts), what ``lzma`` (preset 9 | extreme) still
gains on the saved file, and the median time of ``save_compressed`` and
``load_compressed`` over interleaved repeats, next to ``np.save``/``np.load`` of the same
weights as float32 (the baseline measured in the same run). Targets: file within 2% of
the bound, lzma gain under 2%, save and load of 1e7 weights under 1 s each. Prints a
markdown table; asserts nothing.

    python benchmarks/bench_export.py           # includes the 1e7-weight cases
    python benchmarks/bench_export.py --quick   # small cases only
"""

import argparse
import itertools
import lzma
import os
import statistics
import tempfile
import time

import jax
import numpy as np

import fisher_optax
from fisher_optax import compression_report, load_compressed, quantize, save_compressed


def mlp(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"dense_{i}": {
            "kernel": rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32),
            "bias": rng.normal(0, 0.01, b).astype(np.float32),
        }
        for i, (a, b) in enumerate(itertools.pairwise(sizes))
    }


def magnitude_mask(params, sparsity):
    out = {}
    for name, layer in params.items():
        k = np.abs(layer["kernel"])
        out[name] = {
            "kernel": k > np.quantile(k, sparsity),
            "bias": np.ones_like(layer["bias"], bool),
        }
    return out


def cases(quick: bool):
    lenet = mlp((784, 300, 100, 10))
    mask = magnitude_mask(lenet, 0.9)
    yield "LeNet-300-100, 90% sparse, 4-bit k-means", quantize(lenet, 4, mask=mask)
    rng = np.random.default_rng(1)
    fisher = {n: {k: rng.lognormal(0, 2, v.shape) for k, v in d.items()} for n, d in lenet.items()}
    bits = fisher_optax.allocate_bits(lenet, fisher=fisher, bit_widths=(6, 4, 2), mask=mask)
    yield "LeNet-300-100, 90% sparse, Fisher bits 6/4/2", quantize(lenet, bits, mask=mask)
    yield "LeNet-300-100, dense, 3-bit uniform", quantize(lenet, 3, method="uniform")
    if quick:
        return
    big = mlp((2000, 2500, 1500, 1000))  # 1.03e7 weights
    yield (
        "1e7 weights, 90% sparse, 4-bit uniform",
        quantize(big, 4, mask=magnitude_mask(big, 0.9), method="uniform"),
    )
    yield "1e7 weights, dense, 4-bit uniform", quantize(big, 4, method="uniform")


def timed_pair(fns, repeats):
    """Median seconds of each function, run interleaved ``repeats`` times after a warm-up."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    f, g = os.path.join(tmp, "q.fq"), os.path.join(tmp, "w.npy")
    print(
        "| case | weights | file B | bound B | file / bound | lzma gain | save s | load s "
        "| np.save s | np.load s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, q in cases(args.quick):
        report = compression_report(q)
        size = save_compressed(f, q)
        data = open(f, "rb").read()
        lz = len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        leaves = jax.tree.leaves(fisher_optax.dequantize(q))
        dense = np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves])
        save_s, load_s, np_save_s, np_load_s = timed_pair(
            [
                lambda q=q: save_compressed(f, q),
                lambda: load_compressed(f),
                lambda dense=dense: np.save(g, dense),
                lambda: np.load(g),
            ],
            args.repeats,
        )
        print(
            f"| {name} | {report.weights:,} | {size:,} | {report.entropy_bytes:,.0f} "
            f"| {size / report.entropy_bytes:.4f} | {1 - lz / size:+.2%} | {save_s:.3f} "
            f"| {load_s:.3f} | {np_save_s:.3f} | {np_load_s:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
