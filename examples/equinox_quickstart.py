"""Equinox quickstart: train an eqx.nn.MLP pruned by Fisher saliency, quantize it, write the
file and load it back into the MLP.

Run: python examples/equinox_quickstart.py  (needs `pip install fisher-optax[equinox]`)

An Equinox model holds non-array leaves (its activation functions): fisher-optax takes its
arrays, ``eqx.partition(model, eqx.is_inexact_array)``, and the model is rebuilt with
``eqx.combine``. The file is read back with ``like=params``, so every leaf lands at its own
path of the MLP.
"""

import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

import fisher_optax as fo

x, y = load_digits(return_X_y=True)
x = jnp.asarray(x / 16.0, jnp.float32)
y = jnp.asarray(y)

model = eqx.nn.MLP(64, 10, 32, 1, key=jax.random.key(0))
params, static = eqx.partition(model, eqx.is_inexact_array)


def loss_fn(params, xb, yb):
    logits = jax.vmap(eqx.combine(params, static))(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


def accuracy(params):
    return float((jax.vmap(eqx.combine(params, static))(x).argmax(-1) == y).mean())


# Prune to 80% of the weights (biases are not pruned) while training, by Fisher saliency.
steps = 200
opt = fo.pruned(optax.adam(1e-2), fo.polynomial_sparsity(0.8, 0, steps // 2), update_every=20)
state = opt.init(params)


@jax.jit
def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


key = jax.random.key(1)
for _ in range(steps):
    key, sub = jax.random.split(key)
    idx = jax.random.choice(sub, len(x), (128,), replace=False)
    params, state, loss = step(params, state, x[idx], y[idx])
print(f"pruned: loss {float(loss):.3f}, accuracy {accuracy(params):.3f}")
print(f"sparsity of the kernels: {fo.sparsity_report(state.mask).sparsity:.2f}")

# 4-bit Fisher-weighted codebooks, the file, and the MLP back from it.
fisher = fo.fisher_from_state(state, params=params)
q = fo.quantize(params, 4, fisher=fisher, mask=state.mask)
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "mlp.fo"
    size = fo.save_compressed(path, q)
    loaded = fo.dequantize(fo.load_compressed(path, like=params))
restored = eqx.combine(loaded, static)
assert isinstance(restored, eqx.nn.MLP)
acc = accuracy(loaded)
print(f"file: {size} bytes; the MLP loaded back: accuracy {acc:.3f}")
sys.exit(0 if acc > 0.8 else 1)
