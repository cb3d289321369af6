"""Quickstart: train a small classifier with optax.adam and read its Fisher diagonal.

Run: python examples/quickstart.py  (or `make quickstart`)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import fisher_optax

x, y = load_digits(return_X_y=True)
x = jnp.asarray(x / 16.0, jnp.float32)
y = jnp.asarray(y)

k1, k2 = jax.random.split(jax.random.key(0))
params = {
    "hidden": {"kernel": jax.random.normal(k1, (64, 32)) * 0.1, "bias": jnp.zeros(32)},
    "out": {"kernel": jax.random.normal(k2, (32, 10)) * 0.1, "bias": jnp.zeros(10)},
}


def loss_fn(params, x, y):
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


opt = optax.adam(1e-2)
opt_state = opt.init(params)


@jax.jit
def step(params, opt_state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


rng = np.random.default_rng(0)
batch = 128
for _ in range(300):
    idx = rng.choice(len(x), batch, replace=False)
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx])

# Adam's bias-corrected second moment, rescaled by the batch size to the per-example scale.
fisher = fisher_optax.fisher_from_state(opt_state, batch_size=batch)
print(f"final loss {float(loss):.4f}")
for path, f in jax.tree_util.tree_leaves_with_path(fisher):
    print(
        f"{jax.tree_util.keystr(path):24s} shape {f.shape!s:10s} "
        f"mean Fisher {float(f.mean()):.3e}  max {float(f.max()):.3e}"
    )
