"""In place: with the state donated, the compiled update of pruned copies no float32 array.

XLA updates a donated array in place unless it cannot order every read of the old value
before the write of the new one; then it copies the array at every step. pruned's selection
branch reads the weights, the mask and (for the Fisher criteria) Adam's ``nu``, which the
inner update then overwrites; the mask the branch returns orders those reads first. Moving
the inner update into both branches of the ``lax.cond``, for one, would copy every moment
out of the conditional. The copies are counted in the compiled program, which is
deterministic, unlike a timing (benchmarks/bench_step.py times the same functions).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fisher_optax as fo

SIZES = (12, 8, 8, 4)


def make_params():
    rng = np.random.default_rng(0)
    return {
        f"dense{i}": {
            "kernel": jnp.asarray(rng.standard_normal((a, b)), jnp.float32),
            "bias": jnp.zeros(b, jnp.float32),
        }
        for i, (a, b) in enumerate(itertools.pairwise(SIZES))
    }


def loss(params, x):
    h = x
    for i in range(len(SIZES) - 1):
        h = jnp.tanh(h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"])
    return jnp.sum(h**2)


def f32_copies(jitted, *args) -> list[str]:
    """The float32 ``copy`` instructions of the compiled entry computation."""
    text = jitted.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    return [
        line.split(", metadata")[0].strip()
        for line in entry.splitlines()
        if " copy(" in line and "= f32[" in line
    ]


def donated_update(opt, state_first=True):
    """``opt.update`` jitted with the state donated. ``jit`` pairs each output, in order, with
    the first donated input of its shape and dtype: with the state returned first, each state
    leaf gets its own buffer back."""

    def update(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return (state, updates) if state_first else (updates, state)

    return jax.jit(update, donate_argnums=1)


SCHEDULE = {"schedule": fo.constant_sparsity(0.5), "update_every": 3}


@pytest.mark.parametrize(
    ("inner", "options"),
    [
        (optax.adam(1e-2), {"criterion": "fisher", "method": "two_stage"}),
        (
            optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
            {"criterion": "saliency", "method": "one_stage"},
        ),
        (optax.adamw(1e-2), {"criterion": "magnitude", "method": "one_stage"}),
    ],
    ids=["fisher-two_stage", "saliency-one_stage-chain", "magnitude-adamw"],
)
def test_donated_update_copies_no_float32_array(inner, options):
    params = make_params()
    grads = jax.grad(loss)(params, jnp.ones((2, SIZES[0])))
    opt = fo.pruned(inner, **SCHEDULE, **options)
    assert f32_copies(donated_update(opt), grads, opt.init(params), params) == []


def test_copies_are_counted_when_the_updates_take_the_moments_buffers():
    # Returned as opt.update returns them, the updates are paired with the first moment's
    # buffers and the moments with the next ones: XLA copies, for plain Adam as well.
    params = make_params()
    opt = optax.adam(1e-2)
    copies = f32_copies(donated_update(opt, state_first=False), params, opt.init(params), params)
    assert len(copies) >= len(jax.tree.leaves(params))


def test_donated_train_step_copies_what_plain_adam_copies():
    params = make_params()
    x = jnp.ones((2, SIZES[0]))

    def copied_shapes(opt):
        def step(params, state):
            updates, state = opt.update(jax.grad(loss)(params, x), state, params)
            return optax.apply_updates(params, updates), state

        copies = f32_copies(jax.jit(step, donate_argnums=(0, 1)), params, opt.init(params))
        return sorted(line.split(" = ")[1].split(" ")[0] for line in copies)

    wrapped = fo.pruned(optax.adam(1e-2), **SCHEDULE)
    assert copied_shapes(wrapped) == copied_shapes(optax.adam(1e-2))
