"""Does fine-tuning the codebooks (Deep Compression's trained quantization) pay?

On scikit-learn's digits (1297 train / 500 held-out test images, split per seed), a ReLU
MLP 64-128-64-10 is trained with optax.adam, 80% of each kernel is pruned by magnitude
(``magnitude_mask(pattern=Unstructured("layer"))``) and the survivors retrained under
``keep_pruned``, then every kernel is quantized at 3 and at 2 bits (``quantize``: 8 or 4
shared values per layer, biases kept raw). The quantized model is fine-tuned for N steps with
``share_codebooks(optax.adam(lr), q)``: once training only the codebook entries
(``raw="freeze"``) and once training the raw biases too (``raw="train"``, the default).
Prints test accuracy and training loss at each stage (median and range over seeds; 500
test images, so one image is 0.2 points), and checks that the
fine-tuned params are still exactly the codes of ``q`` with new codebooks (``requantize``).

Run: python benchmarks/bench_codebooks.py [--quick]
"""

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import fisher_optax as fo

SIZES = (64, 128, 64, 10)


def init_params(key):
    params = {}
    for i, (m, n) in enumerate(itertools.pairwise(SIZES)):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(sub, (m, n)) * jnp.sqrt(2.0 / m),
            "bias": jnp.zeros((n,)),
        }
    return params


def logits_fn(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y))


def train(params, tx, x, y, steps, key, batch=128):
    """``steps`` Adam steps on random mini-batches, one jitted scan."""
    state = tx.init(params)

    def step(carry, k):
        params, state = carry
        idx = jax.random.choice(k, x.shape[0], (batch,), replace=False)
        grads = jax.grad(loss_fn)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))(
        (params, state), jax.random.split(key, steps)
    )
    return params


def run(seed, args):
    images, labels = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(labels))
    x = jnp.asarray(images[perm] / 16.0, jnp.float32)
    y = jnp.asarray(labels[perm])
    xtr, ytr, xte, yte = x[500:], y[500:], x[:500], y[:500]
    k = jax.random.split(jax.random.key(seed), 5)
    row = {}
    stats = lambda p: (accuracy(p, xte, yte), float(loss_fn(p, xtr, ytr)))
    dense = train(init_params(k[0]), optax.adam(1e-3), xtr, ytr, args.steps, k[1])
    row["dense"] = stats(dense)
    kernels = lambda path, leaf: leaf.ndim >= 2
    mask = fo.magnitude_mask(
        dense, args.sparsity, pattern=fo.Unstructured("layer"), prunable=kernels
    )
    pruned = fo.apply_mask(dense, mask)
    row["pruned"] = stats(pruned)
    tx = optax.chain(optax.adam(1e-3), fo.keep_pruned(mask))
    pruned = train(pruned, tx, xtr, ytr, args.retrain, k[2])
    row["retrained under the mask"] = stats(pruned)
    for bits in args.bits:
        q = fo.quantize(pruned, bits, mask=mask)
        start = fo.dequantize(q)
        row[f"{bits}-bit quantized"] = stats(start)
        for raw in ("freeze", "train"):
            tx = fo.share_codebooks(optax.adam(args.lr), q, raw=raw)
            tuned = train(start, tx, xtr, ytr, args.finetune, k[3])
            trained_q = fo.requantize(tuned, q)  # raises if a weight left its entry
            for i, ok in enumerate(q.quantized):
                if ok:
                    assert np.array_equal(np.asarray(trained_q.codes[i]), np.asarray(q.codes[i]))
            row[f"{bits}-bit fine-tuned (raw={raw})"] = stats(fo.dequantize(trained_q))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000, help="dense Adam steps")
    parser.add_argument("--retrain", type=int, default=500, help="masked retraining steps")
    parser.add_argument("--finetune", type=int, default=300, help="codebook fine-tuning steps")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr on the codebooks")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.retrain, args.finetune = 1, 500, 200, 100
    rows = [run(seed, args) for seed in range(args.seeds)]
    print(
        f"digits, MLP {'-'.join(map(str, SIZES))}, {args.sparsity:.0%} of each kernel pruned, "
        f"k-means codebooks, {args.finetune} fine-tuning steps (Adam lr {args.lr}), "
        f"{args.seeds} seed(s)"
    )
    print("| stage | test accuracy, median [min, max] | train loss, median |")
    print("|---|---|---|")
    for stage in rows[0]:
        acc = np.array([r[stage][0] for r in rows]) * 100
        loss = np.median([r[stage][1] for r in rows])
        print(
            f"| {stage} | {np.median(acc):.1f}% [{acc.min():.1f}, {acc.max():.1f}] | {loss:.3f} |"
        )
    for bits in args.bits:
        gain = [
            r[f"{bits}-bit fine-tuned (raw=freeze)"][0] - r[f"{bits}-bit quantized"][0]
            for r in rows
        ]
        print(
            f"{bits} bits: fine-tuning the codebooks alone changes test accuracy by "
            f"{np.median(gain) * 100:+.1f} points (median; per seed "
            f"{', '.join(f'{g * 100:+.1f}' for g in gain)})"
        )


if __name__ == "__main__":
    main()
