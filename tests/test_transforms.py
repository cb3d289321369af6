"""keep_pruned and pruned: exact zeros, masks that grow on schedule, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fisher_optax as fo

SHAPES = {"dense": {"kernel": (6, 5), "bias": (5,)}, "out": {"kernel": (5, 3)}}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s).astype(np.float32)),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def grads_at(params, i):
    """Deterministic, nonzero pseudo-gradients (different at every step)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(42), i), len(leaves))
    return jax.tree.unflatten(
        treedef, [p + jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )


def n_prunable(params):
    return sum(x.size for x in jax.tree.leaves(params) if x.ndim >= 2)


# ------------------------------------------------------------------------------------------
# keep_pruned

KEEP_MASK_SEEDS = st.integers(0, 2**31 - 1)


def _adamw_keep_step():
    """One jitted step of adamw (weight decay) + keep_pruned, compiled once for all examples."""
    opt = optax.chain(optax.adamw(0.05, weight_decay=0.5), fo.keep_pruned(None))

    @jax.jit
    def step(params, state, i):
        updates, state = opt.update(grads_at(params, i), state, params)
        return optax.apply_updates(params, updates), state

    return step


_KEEP_STEP = _adamw_keep_step()


_ADAMW = optax.adamw(0.05, weight_decay=0.5)
_ADAMW_STEP = jax.jit(lambda p, s, i: _ADAMW.update(grads_at(p, i), s, p))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(KEEP_MASK_SEEDS, st.integers(1, 8))
def test_keep_pruned_zeros_stay_exact_under_adamw_and_old_momentum(seed, warm):
    rng = np.random.default_rng(seed)
    params = make_params(seed % 7)
    mask = jax.tree.map(lambda p: jnp.asarray(rng.uniform(size=p.shape) > 0.5), params)
    # Momentum built before pruning: adamw runs unmasked for `warm` steps first.
    inner = _ADAMW.init(params)
    for i in range(warm):
        updates, inner = _ADAMW_STEP(params, inner, i)
        params = optax.apply_updates(params, updates)
    state = (inner, fo.KeepPrunedState(mask=mask))
    for i in range(20):
        params, state = _KEEP_STEP(params, state, i)
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
            assert np.all(np.asarray(p)[np.asarray(m)] != 0.0)


def test_keep_pruned_leaves_kept_updates_unchanged():
    params = make_params()
    mask = fo.magnitude_mask(params, 0.5)
    opt = fo.keep_pruned(mask)
    state = opt.init(params)
    updates = grads_at(params, 0)
    out, _ = opt.update(updates, state, params)
    for u, o, p, m in zip(*map(jax.tree.leaves, (updates, out, params, mask)), strict=True):
        np.testing.assert_array_equal(np.where(m, u, -p), o)


def test_keep_pruned_errors():
    params = make_params()
    with pytest.raises(ValueError, match=r"keep_pruned: mask has no leaf at \['out'\]\['kernel'\]"):
        fo.keep_pruned(
            {"dense": {"kernel": jnp.ones((6, 5), bool), "bias": jnp.ones(5, bool)}}
        ).init(params)
    with pytest.raises(TypeError, match=r"keep_pruned: mask at .* has dtype float32"):
        fo.keep_pruned(jax.tree.map(jnp.ones_like, params)).init(params)
    opt = fo.keep_pruned(fo.magnitude_mask(params, 0.5))
    with pytest.raises(ValueError, match=r"keep_pruned: update needs the current params"):
        opt.update(params, opt.init(params))


# ------------------------------------------------------------------------------------------
# pruned


def train(opt, params, steps, start=0):
    traces = []

    @jax.jit
    def step(params, state, i):
        traces.append(1)
        updates, state = opt.update(grads_at(params, i), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    history = []
    for i in range(start, start + steps):
        params, state = step(params, state, i)
        history.append((params, state))
    return history, len(traces), step


def test_pruned_compiles_once_over_100_steps_and_follows_the_schedule():
    params = make_params()
    schedule = fo.polynomial_sparsity(0.8, begin_step=10, end_step=70)
    opt = fo.pruned(optax.adam(1e-2), schedule=schedule, update_every=15)
    history, n_traces, step = train(opt, params, 100)
    assert n_traces == 1 and step._cache_size() == 1
    n = n_prunable(params)
    pruned_before = 0
    for t, (p, state) in enumerate(history):
        pruned_now = sum(int((~m).sum()) for m in jax.tree.leaves(state.mask))
        if t % 15 == 0:  # a mask update step: exactly round(s_t * n), never fewer than before
            assert pruned_now == max(round(float(schedule(t)) * n), pruned_before)
        else:
            assert pruned_now == pruned_before
        # Masks only grow; pruned weights are exactly 0; biases are never pruned.
        assert pruned_now >= pruned_before
        for w, m in zip(jax.tree.leaves(p), jax.tree.leaves(state.mask), strict=True):
            assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
        assert bool(jnp.all(state.mask["dense"]["bias"]))
        pruned_before = pruned_now
    assert pruned_before == round(0.8 * n)  # several updates happened (15, 30, ... 90)


def test_pruned_mask_equals_two_stage_mask_from_the_same_state():
    params = make_params(3)
    opt = fo.pruned(
        optax.adam(1e-2, b2=0.9),
        schedule=fo.constant_sparsity(0.6, step=0),
        magnitude_fraction=0.25,
        criterion="saliency",
        update_every=4,
    )
    history, _, step = train(opt, params, 4)
    params4, state4 = history[-1]
    # A Fisher method skips step 0 (no gradient seen yet): nothing pruned in 4 steps.
    assert all(bool(jnp.all(m)) for m in jax.tree.leaves(state4.mask))
    # Step 4 updates the mask: reproduce it with the public functions.
    fisher = fo.fisher_from_state(state4.inner_state, b2=0.9)
    want = fo.two_stage_mask(
        params4, fisher, 0.6, magnitude_sparsity=0.15, criterion="saliency", mask=state4.mask
    )
    params5, state5 = step(params4, state4, 4)
    for got, w in zip(jax.tree.leaves(state5.mask), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, w)
    for p, w in zip(jax.tree.leaves(params5), jax.tree.leaves(want), strict=True):
        assert np.all(np.asarray(p)[~np.asarray(w)] == 0.0)
    # The inner moments: Adam's recursion on the masked gradient, zero where pruned.
    g = grads_at(params4, 4)
    for mu4, nu4, mu5, nu5, gg, m in zip(
        *map(
            jax.tree.leaves,
            (
                state4.inner_state[0].mu,
                state4.inner_state[0].nu,
                state5.inner_state[0].mu,
                state5.inner_state[0].nu,
                g,
                want,
            ),
        ),
        strict=True,
    ):
        m = np.asarray(m)
        gm = np.where(m, np.asarray(gg), 0)
        np.testing.assert_allclose(mu5, np.where(m, 0.9 * np.asarray(mu4) + 0.1 * gm, 0), rtol=1e-6)
        np.testing.assert_allclose(
            nu5, np.where(m, 0.9 * np.asarray(nu4) + 0.1 * gm**2, 0), rtol=1e-6
        )
        assert np.all(np.asarray(nu5)[~m] == 0)


@pytest.mark.parametrize("method", ["magnitude", "fisher", "random"])
def test_pruned_methods_reach_exact_sparsity_per_layer(method):
    params = make_params(1)
    key = jax.random.key(0) if method == "random" else None
    opt = fo.pruned(
        optax.adam(1e-2), schedule=0.5, method=method, scope="layer", update_every=5, key=key
    )
    history, _, _ = train(opt, params, 6)
    _, state = history[-1]
    assert int((~state.mask["dense"]["kernel"]).sum()) == 15
    assert int((~state.mask["out"]["kernel"]).sum()) == round(0.5 * 15)
    # Step 0 updates the mask for magnitude and random; the Fisher method waits for step 5.
    p0 = history[0][0]
    assert int((p0["out"]["kernel"] == 0).sum()) == (0 if method == "fisher" else 8)
    p5 = history[5][0]
    assert int((p5["out"]["kernel"] == 0).sum()) == 8


def test_pruned_inside_chain_and_with_inject_hyperparams_inner():
    params = make_params(2)
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b2=0.9)
    opt = optax.chain(
        optax.clip_by_global_norm(10.0),
        fo.pruned(inner, schedule=fo.constant_sparsity(0.5, step=2), update_every=2),
    )
    history, n_traces, _ = train(opt, params, 10)
    assert n_traces == 1
    p, state = history[-1]
    pstate = state[1]
    assert isinstance(pstate, fo.PrunedState) and int(pstate.count) == 10
    n = n_prunable(params)
    assert sum(int((~m).sum()) for m in jax.tree.leaves(pstate.mask)) == round(0.5 * n)
    assert sum(int((w == 0).sum()) for w in jax.tree.leaves(p)) == round(0.5 * n)
    # The Fisher the transform read is the injected-b2 one: fisher_from_state agrees.
    fisher = fo.fisher_from_state(pstate.inner_state)
    assert all(np.all(np.isfinite(np.asarray(f))) for f in jax.tree.leaves(fisher))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1))
def test_pruned_adamw_weight_decay_keeps_pruned_weights_exactly_zero(seed):
    params = make_params(seed % 5)
    _, state = _PRUNED_ADAMW[1](params)
    for i in range(25):
        params, state = _PRUNED_ADAMW[0](params, state, jnp.int32(seed % 1000 + i))
        for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(state.mask), strict=True):
            assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
    assert sum(int((~m).sum()) for m in jax.tree.leaves(state.mask)) == round(0.7 * 45)


def _pruned_adamw():
    opt = fo.pruned(
        optax.adamw(0.05, weight_decay=0.5),
        schedule=fo.polynomial_sparsity(0.7, begin_step=0, end_step=20),
        update_every=5,
    )

    @jax.jit
    def step(params, state, i):
        updates, state = opt.update(grads_at(params, i), state, params)
        return optax.apply_updates(params, updates), state

    return step, lambda p: (p, opt.init(p))


_PRUNED_ADAMW = _pruned_adamw()


def test_pruned_with_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    tx = fo.pruned(optax.adam(1e-2), schedule=fo.constant_sparsity(0.75, step=1), update_every=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 3)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(1)

        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads)

    for _ in range(6):
        train_step(model, optimizer, x, y)
    assert len(traces) == 1
    k1, k2 = np.asarray(model.l1.kernel[...]), np.asarray(model.l2.kernel[...])
    n = k1.size + k2.size
    assert int((k1 == 0).sum() + (k2 == 0).sum()) == round(0.75 * n)
    assert np.all(np.asarray(model.l1.bias[...]) != 0)
    # Fisher from the nnx optimizer is zero exactly where the weights are pruned.
    fisher = fo.fisher_from_state(optimizer)
    assert np.all(np.asarray(fisher["l1"]["kernel"][...])[k1 == 0] == 0)


def test_pruned_errors():
    adam = optax.adam(1e-3)
    with pytest.raises(ValueError, match=r"method must be one of 'magnitude'.*got 'l1'"):
        fo.pruned(adam, schedule=0.5, method="l1")
    with pytest.raises(ValueError, match=r"method='random' needs key="):
        fo.pruned(adam, schedule=0.5, method="random")
    with pytest.raises(ValueError, match="key is only used by method='random'"):
        fo.pruned(adam, schedule=0.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="update_every must be a positive int, got 0"):
        fo.pruned(adam, schedule=0.5, update_every=0)
    with pytest.raises(ValueError, match=r"magnitude_fraction must lie in \[0, 1\]"):
        fo.pruned(adam, schedule=0.5, magnitude_fraction=1.5)
    with pytest.raises(ValueError, match=r"criterion must be 'fisher'"):
        fo.pruned(adam, schedule=0.5, criterion="obd")
    with pytest.raises(ValueError, match=r"scope must be 'global'"):
        fo.pruned(adam, schedule=0.5, scope="net")
    params = make_params()
    with pytest.raises(ValueError, match=r"pruned: method='two_stage' ranks by the Fisher.*sgd"):
        fo.pruned(optax.sgd(0.1, momentum=0.9), schedule=0.5).init(params)
    opt = fo.pruned(adam, schedule=0.5)
    with pytest.raises(ValueError, match="pruned: update needs the current params"):
        opt.update(params, opt.init(params))
    # Magnitude pruning needs no second moment: sgd is fine.
    fo.pruned(optax.sgd(0.1), schedule=0.5, method="magnitude").init(params)
