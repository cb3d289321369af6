"""Every ```python block of the README runs as written, in order, in one namespace.

The README's snippets continue one another (``mask`` from the pruning snippet is used by the
quantization snippet), and they refer to what a user has at hand: ``params``, an optimizer
state ``opt_state`` that has seen gradients, a ``loss_fn(params, batch)`` and ``batches``,
arbitrary ``my_scores``, a Flax ``model`` (an ``nnx.Sequential`` MLP). The
prelude below provides exactly those names and nothing else, so a renamed function or a
changed signature in the library makes this test fail until the README follows.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import optax

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _prelude() -> dict:
    from flax import nnx

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "hidden": {"kernel": jax.random.normal(k1, (64, 32)) * 0.2, "bias": jnp.zeros(32)},
        "out": {"kernel": jax.random.normal(k2, (32, 10)) * 0.2, "bias": jnp.zeros(10)},
    }
    x = jax.random.normal(k3, (384, 64))
    y = jnp.arange(384) % 10
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 384, 128)]

    def loss_fn(p, batch):
        inputs, labels = batch
        h = jnp.tanh(inputs @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        logits = h @ p["out"]["kernel"] + p["out"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    for batch in batches:
        updates, opt_state = opt.update(jax.grad(loss_fn)(params, batch), opt_state, params)
        params = optax.apply_updates(params, updates)
    my_scores = jax.tree.map(jnp.abs, params)

    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Linear(64, 32, rngs=rngs), jax.nn.relu, nnx.Linear(32, 10, rngs=rngs)
    )
    return {
        "params": params,
        "opt_state": opt_state,
        "my_scores": my_scores,
        "model": model,
        "loss_fn": loss_fn,
        "batches": batches,
    }


def test_readme_has_snippets():
    assert len(BLOCK.findall(README.read_text())) >= 3


def test_readme_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # snippets may write files (model.fq)
    namespace = _prelude()
    for i, block in enumerate(BLOCK.findall(README.read_text()), start=1):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # name the block: the traceback alone points into exec
            raise AssertionError(f"README python block {i} failed:\n{block}") from err
