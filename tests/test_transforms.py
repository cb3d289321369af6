"""keep_pruned and pruned: exact zeros, masks that grow on schedule, one compilation."""

import dataclasses
import itertools
from fractions import Fraction

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
    # The mask lives in the state (swapped in by each example); this one only fixes its shape.
    placeholder = jax.tree.map(lambda p: jnp.ones(p.shape, bool), make_params())
    opt = optax.chain(optax.adamw(0.05, weight_decay=0.5), fo.keep_pruned(placeholder))

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
    with pytest.raises(ValueError, match=r"mask has no leaf at \['out'\]\['kernel'\]"):
        fo.keep_pruned(
            {"dense": {"kernel": jnp.ones((6, 5), bool), "bias": jnp.ones(5, bool)}}
        ).init(params)
    with pytest.raises(TypeError, match=r"mask at .* has dtype float32"):
        fo.keep_pruned(jax.tree.map(jnp.ones_like, params)).init(params)
    opt = fo.keep_pruned(fo.magnitude_mask(params, 0.5))
    with pytest.raises(ValueError, match=r"update needs the current params"):
        opt.update(params, opt.init(params))
    with pytest.raises(TypeError, match=r"mask must be a pytree of bool arrays .* got None"):
        fo.keep_pruned(None)


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
        params4,
        0.6,
        fisher=fisher,
        magnitude_fraction=0.25,
        criterion="saliency",
        mask=state4.mask,
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
        optax.adam(1e-2),
        0.5,
        criterion=method,
        method="one_stage",
        pattern=fo.Unstructured("layer"),
        update_every=5,
        key=key,
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
    # The Fisher is read with the injected b2 (0.9), not optax's default 0.999: it equals
    # nu / (1 - 0.9**t) computed in NumPy from the stored nu.
    fisher = fo.fisher_from_state(pstate.inner_state)
    nu = pstate.inner_state.inner_state[0].nu
    for f, v in zip(jax.tree.leaves(fisher), jax.tree.leaves(nu), strict=True):
        np.testing.assert_allclose(f, np.asarray(v, np.float64) / (1 - 0.9**10), rtol=1e-5)
        assert not np.allclose(f, np.asarray(v) / (1 - 0.999**10))


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
    with pytest.raises(ValueError, match=r"method must be one of: 'one_stage'.*Got 'l1'"):
        fo.pruned(adam, 0.5, method="l1")
    with pytest.raises(ValueError, match=r"criterion='random' needs key="):
        fo.pruned(adam, 0.5, criterion="random")
    with pytest.raises(ValueError, match="key is only used by criterion='random'"):
        fo.pruned(adam, 0.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="update_every must be an int >= 1, got 0"):
        fo.pruned(adam, 0.5, update_every=0)
    with pytest.raises(TypeError, match="update_every must be an int >= 1, got True"):
        fo.pruned(adam, 0.5, update_every=True)
    with pytest.raises(ValueError, match=r"magnitude_fraction must be a finite number in \[0.0"):
        fo.pruned(adam, 0.5, magnitude_fraction=1.5)
    with pytest.raises(ValueError, match=r"criterion must be one of: 'magnitude'.*Got 'obd'"):
        fo.pruned(adam, 0.5, criterion="obd")
    with pytest.raises(ValueError, match=r"scope must be one of: 'global'"):
        fo.pruned(adam, 0.5, pattern=fo.Unstructured("net"))
    with pytest.raises(TypeError, match=r"pattern must be a selection pattern .*Got the class NM"):
        fo.pruned(adam, 0.5, pattern=fo.NM)
    with pytest.raises(TypeError, match=r"pattern must be a selection pattern .*Got 'layer'"):
        fo.pruned(adam, 0.5, pattern="layer")
    with pytest.raises(TypeError, match=r"end_step must be an int >= 0, got 2\.5"):
        fo.pruned(adam, 0.5, end_step=2.5)
    with pytest.raises(ValueError, match="end_step must be an int >= 0, got -1"):
        fo.pruned(adam, 0.5, end_step=-1)
    with pytest.raises(TypeError, match=r"prunable must accept 2 positional arguments"):
        fo.pruned(adam, 0.5, prunable=lambda leaf: True)
    params = make_params()
    with pytest.raises(ValueError, match=r"criterion='fisher' ranks by the Fisher.*"):
        fo.pruned(optax.sgd(0.1, momentum=0.9), 0.5).init(params)
    opt = fo.pruned(adam, 0.5)
    with pytest.raises(ValueError, match="update needs the current params"):
        opt.update(params, opt.init(params))
    # A bad schedule fails at init, not silently inside jit.
    with pytest.raises(ValueError, match=r"schedule\(0\) must be a finite number in \[0.0, 1.0\]"):
        fo.pruned(adam, lambda t: 1.5 + 0.0 * t).init(params)
    with pytest.raises(ValueError, match=r"schedule\(0\) must be a finite number.*got nan"):
        fo.pruned(adam, lambda t: jnp.float32(jnp.nan)).init(params)
    with pytest.raises(ValueError, match=r"sparsity must be a finite number in \[0.0, 1.0\]"):
        fo.pruned(adam, 1.5)
    with pytest.raises(ValueError, match=r"sparsity names the path \"\['nope'\]\""):
        fo.pruned(adam, 1.0, sparsity={"['nope']": 0.5}).init(params)
    # Magnitude pruning needs no second moment: sgd is fine.
    fo.pruned(optax.sgd(0.1), 0.5, criterion="magnitude").init(params)


def test_pruned_chain_fisher_tracker_sgd_ranks_by_the_tracked_fisher():
    params = make_params(4)
    opt = fo.pruned(
        optax.chain(fo.fisher_tracker(decay=0.9), optax.sgd(0.05)),
        0.5,
        criterion="fisher",
        method="one_stage",
        update_every=3,
    )
    history, n_traces, step = train(opt, params, 3)
    params3, state3 = history[-1]
    assert n_traces == 1
    # Step 3 prunes by the tracker's EMA of squared gradients: the NumPy reference replays
    # the three gradients the tracker saw (no mask yet: count 0 is skipped for the Fisher).
    nu = jax.tree.map(lambda p: np.zeros(p.shape), params)
    p = params
    for i in range(3):
        g = grads_at(p, i)
        nu = jax.tree.map(lambda v, gg: 0.9 * v + 0.1 * np.asarray(gg, np.float64) ** 2, nu, g)
        p = history[i][0]
    fisher_ref = jax.tree.map(lambda v: v / (1 - 0.9**3), nu)
    np.testing.assert_allclose(
        fo.fisher_from_state(state3.inner_state)["dense"]["kernel"],
        fisher_ref["dense"]["kernel"],
        rtol=1e-5,
    )
    _, state4 = step(params3, state3, 3)
    want = fo.select(jax.tree.map(jnp.asarray, fisher_ref), 0.5)
    for got, w in zip(jax.tree.leaves(state4.mask), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, w)


# Every criterion and both methods, in three combinations (each compiles its own step).
COMBOS = [("magnitude", "two_stage"), ("saliency", "one_stage"), ("random", "one_stage")]


@pytest.mark.parametrize(("criterion", "method"), COMBOS)
def test_pruned_works_eagerly_and_matches_jit(criterion, method):
    params = make_params(5)
    key = jax.random.key(1) if criterion == "random" else None
    opt = fo.pruned(
        optax.adam(1e-2), 0.6, criterion=criterion, method=method, update_every=2, key=key
    )
    eager_p, eager_s = params, opt.init(params)
    for i in range(3):  # the Fisher criteria update at step 2, the others at 0 and 2
        updates, eager_s = opt.update(grads_at(eager_p, i), eager_s, eager_p)
        eager_p = optax.apply_updates(eager_p, updates)
    history, _, _ = train(opt, params, 3)
    jit_p, jit_s = history[-1]
    for a, b in zip(jax.tree.leaves(eager_s.mask), jax.tree.leaves(jit_s.mask), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sum(int((~m).sum()) for m in jax.tree.leaves(eager_s.mask)) == round(
        0.6 * n_prunable(params)
    )
    for a, b in zip(jax.tree.leaves(eager_p), jax.tree.leaves(jit_p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pruned_eager_under_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    tx = fo.pruned(optax.adam(1e-2), 0.5, update_every=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (16, 6))
    for _ in range(3):  # eagerly: no nnx.jit
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
    kernels = [np.asarray(layer.kernel[...]) for layer in model.layers]
    assert sum(int((k == 0).sum()) for k in kernels) == round(0.5 * (48 + 16))


def test_pruned_per_leaf_targets_follow_the_schedule_together():
    params = make_params(6)
    targets = fo.erk_sparsity(params, 0.6)
    progress = fo.polynomial_sparsity(1.0, begin_step=0, end_step=4)
    opt = fo.pruned(
        optax.adam(1e-2),
        progress,
        criterion="magnitude",
        sparsity=targets,
        method="one_stage",
        update_every=2,
    )
    history, n_traces, _ = train(opt, params, 5)
    assert n_traces == 1
    for t in (2, 4):  # each leaf at target * progress(t), exactly
        state = history[t][1]
        for name in ("dense", "out"):
            n = params[name]["kernel"].size
            s = np.float32(targets[name]["kernel"]) * np.float32(progress(t))
            want = round(Fraction(float(s)) * n)
            assert int((~state.mask[name]["kernel"]).sum()) == want
    assert bool(jnp.all(history[-1][1].mask["dense"]["bias"]))


@dataclasses.dataclass(frozen=True)
class Rows:
    """A pattern defined outside the library: whole rows of each kernel by summed score."""

    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def select(self, scores, sparsity, *, prunable=None, mask=None):
        self.calls.append(sparsity)
        rows = jax.tree.map(lambda s: jnp.sum(s, axis=-1, keepdims=True) * jnp.ones_like(s), scores)
        pattern = fo.Unstructured("layer")
        return fo.select(rows, sparsity, pattern=pattern, prunable=prunable, mask=mask)


def test_pruned_takes_a_pattern_defined_outside_the_library():
    params = make_params(7)
    rows = Rows()
    assert isinstance(rows, fo.Pattern)
    opt = fo.pruned(
        optax.adam(1e-2),
        0.6,
        criterion="magnitude",
        method="one_stage",
        update_every=10,
        pattern=rows,
    )
    history, _, _ = train(opt, params, 1)
    mask = history[0][1].mask
    assert rows.calls  # traced once
    k = np.asarray(mask["out"]["kernel"])  # (5, 3): rows are all kept or all pruned
    assert set(k.all(axis=1) | ~k.any(axis=1)) == {True}
    assert int((~k).sum()) == 9  # 0.6 of 15: three whole rows


def test_pruned_multisteps_waits_for_the_first_accumulated_step():
    """Under MultiSteps the inner Adam's count stays 0 for k micro-steps: its Fisher is 0/0
    until then. A mask update due before it is skipped (it pruned by NaN scores before:
    flat-index order under jit, a ValueError eagerly); the next one prunes by the Fisher."""
    params = make_params(6)
    opt = fo.pruned(
        optax.MultiSteps(optax.adam(1e-2), every_k_schedule=4),
        0.5,
        criterion="fisher",
        method="one_stage",
        update_every=2,
    )
    jitted = jax.jit(opt.update)
    for update in (opt.update, jitted):
        p, s = params, opt.init(params)
        pruned_at = []
        for i in range(7):
            u, s_next = update(grads_at(p, i), s, p)
            inner = s.inner_state.inner_opt_state[0].count
            pruned_at.append(
                (i, int(inner), sum(int((~m).sum()) for m in jax.tree.leaves(s_next.mask)))
            )
            p, s = optax.apply_updates(p, u), s_next
        # Steps 2 (inner count 0) skipped; step 4 (inner count 1) prunes half the kernels.
        assert [n for _, _, n in pruned_at[:4]] == [0, 0, 0, 0]
        assert pruned_at[4][1] == 1 and pruned_at[4][2] == round(0.5 * n_prunable(params))
        fisher = fo.fisher_from_state(s.inner_state)
        assert all(bool(jnp.all(jnp.isfinite(f))) for f in jax.tree.leaves(fisher))


@pytest.mark.parametrize("kind", ["partition", "masked"])
def test_pruned_around_partition_and_masked_inner_optimizers(kind):
    """Their states hold MaskedNode where a group's params are masked out (a structure
    error at the first update before); the moments of each group are zeroed where pruned."""
    params = make_params(7)
    labels = jax.tree.map_with_path(lambda p, x: "k" if x.ndim >= 2 else "b", params)
    if kind == "partition":
        inner = optax.partition({"k": optax.adam(1e-2), "b": optax.adam(1e-3)}, labels)
    else:
        on = jax.tree.map(lambda label: label == "k", labels)
        inner = optax.chain(
            optax.masked(optax.adam(1e-2), on),
            optax.masked(optax.sgd(1e-2), jax.tree.map(lambda x: not x, on)),
        )
    criterion = "fisher" if kind == "partition" else "magnitude"
    opt = fo.pruned(inner, 0.5, criterion=criterion, method="one_stage", update_every=2)
    history, n_traces, _ = train(opt, params, 5)
    params5, state5 = history[-1]
    assert n_traces == 1
    assert sum(int((~m).sum()) for m in jax.tree.leaves(state5.mask)) == round(
        0.5 * n_prunable(params)
    )
    for w, m in zip(jax.tree.leaves(params5), jax.tree.leaves(state5.mask), strict=True):
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
    nu = fo.fisher_from_state(state5.inner_state, missing=0.0, params=params5)
    for f, m in zip(jax.tree.leaves(nu), jax.tree.leaves(state5.mask), strict=True):
        assert np.all(np.asarray(f)[~np.asarray(m)] == 0.0)


@dataclasses.dataclass(frozen=True)
class Regrow:
    """A pattern breaking the rule: it ignores mask= and would regrow pruned weights."""

    def select(self, scores, sparsity, *, prunable=None, mask=None):
        return fo.select(scores, sparsity, prunable=prunable)


@dataclasses.dataclass(frozen=True)
class Floats:
    """A pattern returning float masks."""

    def select(self, scores, sparsity, *, prunable=None, mask=None):
        return jax.tree.map(lambda m: m.astype(float), mask)


def test_pruned_pattern_results_are_checked_and_cannot_regrow_weights():
    params = make_params(8)
    schedule = fo.polynomial_sparsity(0.6, begin_step=0, end_step=3)
    opt = fo.pruned(optax.adam(1e-2), schedule, criterion="random", key=jax.random.key(0),
                    method="one_stage", update_every=1, pattern=Regrow())  # fmt: skip
    history, _, _ = train(opt, params, 4)
    for (_, before), (_, after) in itertools.pairwise(history):
        for a, b in zip(jax.tree.leaves(before.mask), jax.tree.leaves(after.mask), strict=True):
            assert not np.any(np.asarray(b) & ~np.asarray(a))  # masks only grow
    opt = fo.pruned(optax.adam(1e-2), 0.5, criterion="magnitude", pattern=Floats())
    with pytest.raises(TypeError, match=r"pattern Floats\(\) must return a bool mask"):
        opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)


def test_pruned_checks_the_schedule_at_end_step_for_any_callable():
    """The final target of a plain optax schedule is checked at init when end_step says
    where it is; without end_step only steps 0 and update_every are checked."""
    params = make_params()
    overshoot = optax.polynomial_schedule(0.0, 1.5, power=1, transition_steps=10)
    with pytest.raises(ValueError, match=r"schedule\(10\) must be a finite number in \[0.0, 1.0\]"):
        fo.pruned(optax.adam(1e-2), overshoot, update_every=5, end_step=10).init(params)
    fo.pruned(optax.adam(1e-2), overshoot, update_every=5).init(params)  # 0 and 0.75: fine
    ramp = optax.polynomial_schedule(0.0, 0.5, power=1, transition_steps=10)
    opt = fo.pruned(optax.adam(1e-2), ramp, criterion="magnitude", update_every=5, end_step=10)
    history, _, _ = train(opt, params, 11)
    assert int((~history[-1][1].mask["dense"]["kernel"]).sum()) > 0


def test_pruned_grows_a_2_4_pattern_with_two_stages():
    """Both stages select in N:M units: the end of the schedule is the 2:4 pattern."""
    kernel = jnp.asarray(np.random.default_rng(9).standard_normal((8, 4)), jnp.float32)
    params = {"w": kernel, "b": jnp.zeros(4)}
    schedule = fo.polynomial_sparsity(0.5, begin_step=0, end_step=4, power=1)
    opt = fo.pruned(optax.adam(1e-2), schedule, criterion="magnitude", pattern=fo.NM(2, 4, axis=-2),
                    update_every=2, end_step=4)  # fmt: skip
    state = opt.init(params)
    for _ in range(5):
        updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
        params = optax.apply_updates(params, updates)
    kept = np.asarray(state.mask["w"]).reshape(2, 4, 4).sum(axis=1)
    assert (kept == 2).all()
