"""First-call latency of the compression pipeline on Caffe's LeNet-5 shapes (issue 14.1).

A user compresses a trained model once, in a fresh process, so compile time is what they
wait for. Each run is a fresh subprocess (imports excluded from the timings) that times,
on LeNet-5's 431,080 parameters (conv1 5x5x1x20, conv2 5x5x20x50, fc1 800x500, fc2
500x10 and biases; random weights, gamma Fisher, 92% pruned by magnitude):

  mask      magnitude_mask(params, 0.92)
  bits      allocate_bits(params, fisher=, mask=, average_bits=5)
  quantize  quantize(params, bits, fisher=, mask=)
  dequant   dequantize(q)
  save      save_compressed(path, q)

first (cold) and again (warm), and the baseline in the same process: scikit-learn's
weighted ``KMeans(32, n_init=1)`` on each quantized leaf's survivors (cold, then warm).
Runs are repeated and medians printed, with the ratios cold pipeline / baseline (target
<= 25x, goal <= 10x) and warm pipeline / baseline. Asserts nothing about time.

    python benchmarks/bench_latency.py            # 5 fresh processes
    python benchmarks/bench_latency.py --quick    # 2
"""

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, os, tempfile, time
    import numpy as np
    import jax, jax.numpy as jnp
    import fisher_optax as fo
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    shapes = {"conv1": (5, 5, 1, 20), "conv2": (5, 5, 20, 50), "fc1": (800, 500),
              "fc2": (500, 10)}
    params = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[:-1]))
        params[name] = {
            "kernel": jnp.asarray(rng.normal(0, fan_in ** -0.5, shape), jnp.float32),
            "bias": jnp.asarray(rng.normal(0, 0.01, shape[-1:]), jnp.float32),
        }
    fisher = jax.tree.map(
        lambda p: jnp.asarray(rng.gamma(0.3, 1e-4, p.shape), jnp.float32), params)
    jax.block_until_ready((params, fisher))
    path = os.path.join(tempfile.mkdtemp(), "lenet.fq")

    def steps():
        t = {}
        s = time.perf_counter()
        mask = jax.block_until_ready(fo.magnitude_mask(params, 0.92))
        t["mask"] = time.perf_counter() - s
        s = time.perf_counter()
        bits = jax.block_until_ready(
            fo.allocate_bits(params, fisher=fisher, mask=mask, average_bits=5))
        t["bits"] = time.perf_counter() - s
        s = time.perf_counter()
        q = jax.block_until_ready(fo.quantize(params, bits, fisher=fisher, mask=mask))
        t["quantize"] = time.perf_counter() - s
        s = time.perf_counter()
        jax.block_until_ready(fo.dequantize(q))
        t["dequant"] = time.perf_counter() - s
        s = time.perf_counter()
        fo.save_compressed(path, q)
        t["save"] = time.perf_counter() - s
        t["pipeline"] = sum(t.values())
        return t, mask

    def baseline(mask):
        s = time.perf_counter()
        for name in shapes:
            keep = np.asarray(mask[name]["kernel"])
            x = np.asarray(params[name]["kernel"])[keep].reshape(-1, 1)
            w = np.asarray(fisher[name]["kernel"])[keep]
            KMeans(min(32, len(x)), n_init=1, random_state=0).fit(x, sample_weight=w)
        return time.perf_counter() - s

    cold, mask = steps()
    base_cold = baseline(mask)
    warm, _ = steps()
    base_warm = baseline(mask)
    print(json.dumps({"cold": cold, "warm": warm, "base_cold": base_cold,
                      "base_warm": base_warm}))
    """
)

STEPS = ("mask", "bits", "quantize", "dequant", "save", "pipeline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 fresh processes, not 5")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    results = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = lambda key, step=None: statistics.median(
        r[key][step] if step else r[key] for r in results
    )
    base_cold, base_warm = med("base_cold"), med("base_warm")
    print(f"LeNet-5 (431,080 params, 92% pruned), medians of {runs} fresh processes\n")
    print("| step | cold (s) | warm (s) | cold / sklearn cold | warm / sklearn warm |")
    print("|---|---|---|---|---|")
    for step in STEPS:
        c, w = med("cold", step), med("warm", step)
        print(f"| {step} | {c:.3f} | {w:.3f} | {c / base_cold:.1f}x | {w / base_warm:.1f}x |")
    print(f"| sklearn KMeans(32, n_init=1) per leaf | {base_cold:.3f} | {base_warm:.3f} | | |")
    ratio = med("cold", "pipeline") / base_cold
    print(f"\ncold pipeline / sklearn baseline: {ratio:.1f}x (target <= 25x, goal <= 10x)")


if __name__ == "__main__":
    main()
