"""Positions of the kept weights: the file's position coding against relative index coding.

Trains LeNet-300-100 and Caffe LeNet-5 on Fashion-MNIST with the main job's phases
(``experiments/main_job.py``: dense Adam, then ``pruned(adam)`` by OBD saliency through a
staircase of sparsities), quantizes each level as the main job does (``allocate_bits`` at
3.5 bits on average, Fisher-weighted k-means), and prints, per model and sparsity, the bytes
of the position streams and of the whole file: with relative index coding alone (the
coding of format version 3) and with the coding :func:`fisher_optax.save_compressed` picks
per leaf. The two files differ only in their position records, so both sizes come from one
encoding. Per leaf it also prints the mode chosen.

The trained levels are cached in ``results/positions/`` (keyed by the settings and by the
code that trains them: the library except ``export.py``, the main job's training, models
and data loaders, and the versions of jax, jaxlib, optax and numpy), so a rerun only
re-encodes.

    python benchmarks/bench_positions.py            # both models, about 10 minutes on 2 cores
    python benchmarks/bench_positions.py --quick    # tiny training, for a smoke run
"""

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import jax
import jaxlib
import numpy as np
import optax

import fisher_optax
from experiments import datasets, main_job, models
from fisher_optax import export

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "lenet-300-100": dict(dense_steps=3000, ramp=200, hold=200),
    "lenet5": dict(dense_steps=1500, ramp=150, hold=150),
}
LEVELS = (0.9, 0.93, 0.95, 0.97, 0.98)
QUICK = dict(dense_steps=40, ramp=10, hold=10)
METHOD = "saliency"
AVERAGE_BITS = 3.5


def training_version() -> str:
    """A hash of the code that trains the levels: the library but its file encoder, and
    the main job's training, models and data loaders."""
    h = hashlib.sha256()
    library = sorted((REPO / "fisher_optax").rglob("*.py"))
    trainer = [REPO / "experiments" / f for f in ("main_job.py", "models.py", "datasets.py")]
    for path in [*library, *trainer]:
        rel = path.relative_to(REPO)
        if rel != Path("fisher_optax/export.py"):
            h.update(str(rel).encode() + b"\0" + path.read_bytes())
    h.update(json.dumps([jax.__version__, jaxlib.__version__, optax.__version__]).encode())
    h.update(np.__version__.encode())
    return h.hexdigest()[:16]


def trained_levels(name: str, quick: bool, data, cache_dir: Path) -> list[dict]:
    """Per sparsity level: params, mask, Fisher, sparsity and test accuracy (cached)."""
    preset = dict(main_job.PRESETS[name], levels=LEVELS, **SETTINGS[name])
    if quick:
        preset.update(QUICK)
    cfg = main_job.Config(dataset=data.name, model=name, seed=0, **preset)
    key = hashlib.sha256(
        json.dumps([training_version(), dataclasses.asdict(cfg), METHOD]).encode()
    ).hexdigest()[:16]
    cache = main_job.Cache(str(cache_dir))
    hit = cache.get(f"{name}-{METHOD}", key)
    if hit is not None:
        return main_job.cached_levels(*hit)
    model = models.MODELS[name]
    k_dense, k_prune = jax.random.split(jax.random.key(0, impl=main_job.PRNG_IMPL))
    nocache = main_job.Cache(None)
    dense = main_job.dense_phase(cfg, data, model, nocache, k_dense)
    levels = main_job.prune_phase(METHOD, cfg, data, model, nocache, k_prune, dense)
    trees, meta = {}, []
    for i, lvl in enumerate(levels):
        trees.update(
            {f"params{i}": lvl["params"], f"mask{i}": lvl["mask"], f"fisher{i}": lvl["fisher"]}
        )
        meta.append({k: lvl[k] for k in ("level", "sparsity", "accuracy")})
    meta[0]["dense_accuracy"] = dense[3]["accuracy"]
    cache.put(f"{name}-{METHOD}", key, trees, {"levels": meta})
    levels[0]["dense_accuracy"] = dense[3]["accuracy"]
    return levels


def position_bytes(q, report) -> tuple[int, int, list[str]]:
    """Bytes of the position records with relative index coding alone and as written, and
    per quantized leaf the coding chosen."""
    relative = written = 0
    modes = []
    for i, leaf in enumerate(report.leaves):
        if not leaf.quantized:
            continue
        written += leaf.positions.bytes
        if leaf.kept == leaf.weights:
            relative += leaf.positions.bytes  # every weight kept: the same byte in both
            modes.append(f"{leaf.path}: every weight kept")
            continue
        mask = np.asarray(q.bits[i]) != 0
        relative += len(export._relative_record(np.flatnonzero(mask), leaf.weights)[0])
        axis = "" if leaf.position_axis is None else f", counts along axis {leaf.position_axis}"
        dead = [
            int(np.sum(~mask.any(axis=tuple(b for b in range(mask.ndim) if b != a))))
            for a in range(mask.ndim)
        ]
        shape = "x".join(map(str, leaf.shape))
        modes.append(
            f"{leaf.path} {shape}: {leaf.position_coding}{axis}; dead slices per axis {dead}"
        )
    return relative, written, modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="lenet-300-100,lenet5")
    parser.add_argument("--cache-dir", default=str(REPO / "results" / "positions"))
    args = parser.parse_args()
    data = datasets.load_fashion_mnist()
    setting = {"average_bits": AVERAGE_BITS, "granularity": "layer", "entry_bits": 40.0}
    rows, modes = [], {}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        levels = trained_levels(name, args.quick, data, Path(args.cache_dir))
        dense = levels[0]["dense_accuracy"]
        print(f"{name}: dense {dense:.2f}%, levels in {time.perf_counter() - t0:.0f} s", flush=True)
        for lvl in levels:
            q = main_job.quantized(METHOD, setting, lvl)
            report = fisher_optax.compression_report(q)
            relative, written, modes[(name, lvl["level"])] = position_bytes(q, report)
            old_file = report.total_bytes - written + relative
            rows.append(
                f"| {name} | {lvl['sparsity']:.1%} | {lvl['accuracy']:.2f}% | {relative:,} "
                f"| {written:,} | {1 - written / relative:.1%} | {old_file:,} "
                f"| {report.total_bytes:,} | {1 - report.total_bytes / old_file:.1%} |"
            )
    print(
        f"\nPositions and whole file (saliency, {AVERAGE_BITS:g} bits on average), relative "
        "index coding alone against the coding written:\n"
    )
    print(
        "| model | sparsity | test accuracy | positions, relative B | positions, written B "
        "| saved | file, relative B | file, written B | saved |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nCoding per leaf:")
    for (name, level), leaves in modes.items():
        print(f"- {name} at {level:.0%}: " + " | ".join(leaves))


if __name__ == "__main__":
    main()
