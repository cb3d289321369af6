"""Per-channel against per-leaf codebooks at equal file size (LeNet-300-100, 3 bits).

LeNet-300-100 (784-300-100-10, 266,610 parameters; ``experiments/models.py``) is trained with
``optax.adam(1e-3)`` on Fashion-MNIST (Debian's ``dataset-fashion-mnist``; sklearn's 8x8
digits when it is not installed, said in the output), then every kernel is quantized with
Fisher-weighted k-means (``fisher_from_state`` of the Adam state; biases stay raw) and
saved with ``save_compressed``. Configurations, each with its file size in bytes (the
saved file) and its test accuracy:

- ``per-leaf 3 bit``: one 8-entry codebook per kernel (``quantize(params, 3)``).
- ``per-channel 3 bit``: one 8-entry codebook per output channel (``axis=-1``).
- ``per-leaf, equal size``: per-leaf codebooks with the largest share ``p`` of each
  kernel's weights (those of highest saliency ``0.5 F w^2``) at 4 bits and the rest at
  3 bits whose file is no larger than the per-channel 3-bit file (``p`` found by bisection
  on the file size).
- ``per-leaf 4 bit``: one 16-entry codebook per kernel (a larger file: the bracket).
- ``per-channel, allocate_bits``: per-channel codebooks with one width per channel from
  ``allocate_bits(granularity="channel", bit_widths=(4, 3, 2), average_bits=3)`` (a
  slightly larger file: 4-bit channels have 16-entry codebooks).
- ``per-channel, alloc., equal``: the same with the largest ``average_bits`` whose file is
  no larger than the per-channel 3-bit file (bisection on the file size).

Every number is the median (and range) over seeds: a fresh init, data order and training
run per seed. Measured, not asserted.

Run: python benchmarks/bench_channel_codebooks.py [--quick] [--seeds 3] [--epochs 8]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fisher_optax as fo

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import datasets, models

MODEL = models.MODELS["lenet-300-100"]
BATCH = 128
B2 = 0.999  # optax.adam's default; fisher_from_state needs it (it is not in the state)


def load_data():
    try:
        return datasets.load_fashion_mnist()
    except FileNotFoundError:
        return datasets.load_digits_dataset()


def train(data, seed, epochs):
    key = jax.random.key(seed)
    params = MODEL.init(key, data.x_train.shape[1:])
    tx = optax.adam(1e-3, b2=B2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(lambda p: models.loss_fn(MODEL, p, x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    n = data.x_train.shape[0]
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            params, opt_state = step(params, opt_state, data.x_train[idx], data.y_train[idx])
    return params, fo.fisher_from_state(opt_state, b2=B2)


@jax.jit
def _correct(params, x, y):
    return jnp.sum(jnp.argmax(models.apply(MODEL, params, x), -1) == y)


def accuracy(params, data):
    hits = 0
    for i in range(0, data.x_test.shape[0], 2000):
        hits += int(_correct(params, data.x_test[i : i + 2000], data.y_test[i : i + 2000]))
    return hits / data.x_test.shape[0]


def file_bytes(q, tmp):
    n = fo.save_compressed(tmp, q)
    assert n == Path(tmp).stat().st_size  # the bytes of the saved file
    return n


def mixed_bits(params, fisher, p):
    """Per kernel: the share ``p`` of highest saliency at 4 bits, the rest at 3."""

    def leaf(w, f):
        if w.ndim < 2:
            return np.zeros(w.shape, np.int32)
        s = np.asarray(0.5 * f * w * w, np.float64).ravel()
        top = round(p * s.size)
        out = np.full(s.size, 3, np.int32)
        if top:
            out[np.argpartition(-s, top - 1)[:top]] = 4
        return out.reshape(w.shape)

    return jax.tree.map(leaf, params, fisher)


def equal_size_per_leaf(params, fisher, target, tmp, iters=12):
    """The largest ``p`` (to 1/2^iters) whose per-leaf file is at most ``target`` bytes."""
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(iters):
        p = (lo + hi) / 2
        q = fo.quantize(params, mixed_bits(params, fisher, p), fisher=fisher)
        size = file_bytes(q, tmp)
        if size <= target:
            lo, best = p, (p, q, size)
        else:
            hi = p
    if best is None:
        q = fo.quantize(params, 3, fisher=fisher)
        best = (0.0, q, file_bytes(q, tmp))
    return best


def channel_bits(params, fisher, average_bits):
    return fo.allocate_bits(
        params,
        fisher=fisher,
        granularity="channel",
        axis=-1,
        bit_widths=(4, 3, 2),
        average_bits=average_bits,
    )


def equal_size_per_channel(params, fisher, target, tmp, iters=10):
    """The largest ``average_bits`` in [2, 4] whose per-channel file is at most ``target``."""
    lo, hi = 2.0, 4.0
    best = None
    for _ in range(iters):
        beta = (lo + hi) / 2
        q = fo.quantize(params, channel_bits(params, fisher, beta), fisher=fisher, axis=-1)
        size = file_bytes(q, tmp)
        if size <= target:
            lo, best = beta, (beta, q, size)
        else:
            hi = beta
    if best is None:
        q = fo.quantize(params, channel_bits(params, fisher, 2.0), fisher=fisher, axis=-1)
        best = (2.0, q, file_bytes(q, tmp))
    return best


def run_seed(data, seed, epochs, tmp):
    t0 = time.perf_counter()
    params, fisher = train(data, seed, epochs)
    rows = {"dense float32": (accuracy(params, data), 4 * models.n_params(params), "", 0.0)}
    t_train = time.perf_counter() - t0

    kernels = [k for k in jax.tree.leaves(params) if k.ndim >= 2]
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(fisher), strict=True)
    fishers = [f for k, f in pairs if k.ndim >= 2]
    total = sum(float(jnp.sum(f * k * k)) for k, f in zip(kernels, fishers, strict=True))

    def add(name, q, note=""):
        size = file_bytes(q, tmp)
        deq = [d for d in jax.tree.leaves(fo.dequantize(q)) if d.ndim >= 2]
        # Fisher-weighted distortion of the kernels, relative to sum F w^2.
        dist = sum(
            float(jnp.sum(f * (k - d) ** 2)) for k, f, d in zip(kernels, fishers, deq, strict=True)
        )
        rows[name] = (accuracy(fo.dequantize(q), data), size, note, dist / total)
        return size

    add("per-leaf 3 bit", fo.quantize(params, 3, fisher=fisher))
    t1 = time.perf_counter()
    q_channel = fo.quantize(params, 3, fisher=fisher, axis=-1)
    t_channel = time.perf_counter() - t1
    target = add("per-channel 3 bit", q_channel)
    p, q, _ = equal_size_per_leaf(params, fisher, target, tmp)
    add("per-leaf, equal size", q, f"p={p:.3f} at 4 bit")
    add("per-leaf 4 bit", fo.quantize(params, 4, fisher=fisher))
    bits = channel_bits(params, fisher, 3.0)
    add("per-channel, allocate_bits", fo.quantize(params, bits, fisher=fisher, axis=-1))
    beta, q, _ = equal_size_per_channel(params, fisher, target, tmp)
    add("per-channel, alloc., equal", q, f"average_bits={beta:.3f}")
    print(
        f"  seed {seed}: trained in {t_train:.0f} s; per-channel quantize {t_channel:.2f} s",
        flush=True,
    )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch (a smoke run)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
    data = load_data()
    print(
        f"LeNet-300-100 on {data.name} ({data.x_train.shape[0]} train / "
        f"{data.x_test.shape[0]} test), adam 1e-3, {epochs} epochs, {seeds} seed(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = str(Path(d) / "model.fq")
        runs = [run_seed(data, s, epochs, tmp) for s in range(seeds)]
    names = list(runs[0])
    base = np.median([r["per-channel 3 bit"][1] for r in runs])
    print(
        f"\n{'configuration':<28} {'test acc % median [min, max]':>28} {'file bytes':>11} "
        f"{'size ratio':>10} {'F-distortion':>12}  note"
    )
    for name in names:
        acc = np.array([100 * r[name][0] for r in runs])
        size = np.median([r[name][1] for r in runs])
        dist = np.median([r[name][3] for r in runs])
        notes = sorted({r[name][2] for r in runs if r[name][2]})
        acc_s = f"{np.median(acc):.2f} [{acc.min():.2f}, {acc.max():.2f}]"
        print(
            f"{name:<28} {acc_s:>28} {size:>11.0f} {size / base:>10.3f} {dist:>12.2e}  "
            f"{'; '.join(notes)}"
        )
    print(
        "\nsize ratio: file bytes / the per-channel 3-bit file; F-distortion: "
        "sum F (w - q(w))^2 / sum F w^2 over the kernels (F = fisher_from_state of adam)."
    )


if __name__ == "__main__":
    main()
