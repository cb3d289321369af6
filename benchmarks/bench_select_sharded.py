"""Selection over params sharded on 8 host CPU devices: three candidates per pass counted
per shard (explicit mesh axes, ``shard_map``) vs one candidate per pass (plain bisection,
what a mesh of Auto axes gets).

Both are compiled ahead of time on the same explicitly sharded scores (the one-candidate
plan forced by hiding the layout from the kernel), checked to give the same masks, and
timed interleaved; the all-gathers in each compiled program are counted (none expected).
The 8 devices share this machine's cores, so the ratio is about work and passes, not about
a real multi-device interconnect.

    python benchmarks/bench_select_sharded.py            # 6.3M scores
    python benchmarks/bench_select_sharded.py --quick    # 0.4M scores
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fisher_optax as fo
from fisher_optax import _select as select_mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    mesh = Mesh(
        np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("data", "model"), axis_types=explicit
    )
    scale = 4 if args.quick else 1
    shapes = {
        "a": ((2048 // scale, 2048 // scale), P("data", "model")),
        "b": ((4096 // scale, 512 // scale), P(("data", "model"), None)),
        "bias": ((2048,), P("model")),
    }
    rng = np.random.default_rng(0)
    tree = {
        k: jax.device_put(
            jnp.asarray(rng.standard_normal(shape), jnp.float32), NamedSharding(mesh, spec)
        )
        for k, (shape, spec) in shapes.items()
    }
    n = sum(x.size for x in tree.values())
    plans = {}
    real = select_mod.explicit_layout
    try:
        for name, layout in [("3 candidates per shard", real), ("1 candidate", lambda x: None)]:
            select_mod.explicit_layout = layout
            jax.clear_caches()  # the selection's inner jit caches its trace
            plans[name] = jax.jit(lambda t: fo.select(t, 0.9)).lower(tree).compile()
    finally:
        select_mod.explicit_layout = real
    results = {name: fn(tree) for name, fn in plans.items()}
    first, second = results.values()
    for k in tree:  # same masks, not a timing
        assert np.array_equal(np.asarray(first[k]), np.asarray(second[k])), k
    times = {name: [] for name in plans}
    for _ in range(args.repeats):
        for name, fn in plans.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(tree))
            times[name].append(time.perf_counter() - start)
    print(
        f"# {n / 1e6:.1f}M scores on a 2x4 mesh of host CPU devices, jax {jax.__version__}, "
        f"medians of {args.repeats} interleaved calls"
    )
    print("| plan | time | all-gathers | ratio to 1 candidate |")
    print("|---|---:|---:|---:|")
    base = float(np.median(times["1 candidate"]))
    for name, fn in plans.items():
        med = float(np.median(times[name]))
        gathers = len(re.findall(r"\ball-gather(-start)?\(", fn.as_text()))
        print(f"| {name} | {med * 1e3:.1f} ms | {gathers} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
