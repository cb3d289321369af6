"""Block-Fisher Optimal Brain Surgeon (fisher_optax.obs) against NumPy and brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fisher_optax as fo
from fisher_optax import obs

DAMPING = 0.05


def _setup(seed, m, shape=(3, 5)):
    rng = np.random.default_rng(seed)
    grads = {"w": rng.normal(size=(m, *shape)).astype(np.float32)}
    params = {"w": rng.normal(size=shape).astype(np.float32)}
    return params, grads


def _np_blocks(x, b):
    flat = np.ravel(x).astype(np.float64)
    nb = -(-flat.size // b)
    return np.pad(flat, (0, nb * b - flat.size)).reshape(nb, b)


def _np_fisher(g, b, damping=DAMPING):
    """The explicit damped block Fisher, (n_blocks, B, B), in float64."""
    m = g.shape[0]
    gb = np.stack([_np_blocks(gi, b) for gi in g], axis=1)  # (nb, m, B)
    return damping * np.eye(b) + np.einsum("kmi,kmj->kij", gb, gb) / m


@pytest.mark.parametrize("m", [3, 9])  # m < B (Woodbury) and m >= B (direct)
def test_inverse_matches_numpy(m):
    _, grads = _setup(0, m)
    finv = obs.block_fisher_inverse(grads, block_size=4, damping=DAMPING)
    want = np.linalg.inv(_np_fisher(grads["w"], 4))
    assert finv["w"].shape == (4, 4, 4) and finv["w"].dtype == jnp.float32
    np.testing.assert_allclose(finv["w"], want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    half = obs.block_fisher_inverse(grads, block_size=4, damping=DAMPING, dtype=jnp.float16)
    assert half["w"].dtype == jnp.float16
    np.testing.assert_allclose(half["w"], want, rtol=0.05, atol=0.05 * np.abs(want).max())


def test_scores_and_update_match_numpy():
    params, grads = _setup(1, 6)
    finv = obs.block_fisher_inverse(grads, block_size=4, damping=DAMPING)
    inv = np.linalg.inv(_np_fisher(grads["w"], 4))
    wb = _np_blocks(params["w"], 4)
    want_scores = 0.5 * wb**2 / np.diagonal(inv, axis1=1, axis2=2)
    got_scores = obs.obs_scores(params, finv)["w"]
    np.testing.assert_allclose(_np_blocks(got_scores, 4)[:, :], want_scores, rtol=1e-3)

    new, keep = obs.obs_prune(params, finv, 0.4)
    assert int((~keep["w"]).sum()) == 6  # round(0.4 * 15), select's count
    np.testing.assert_array_equal(keep["w"], fo.select(obs.obs_scores(params, finv), 0.4)["w"])
    q = _np_blocks(~np.asarray(keep["w"]), 4).astype(bool)
    q[-1, 3] = False  # the padding
    want = wb.copy()
    for k in range(len(wb)):
        idx = np.flatnonzero(q[k])
        if idx.size:
            z = np.linalg.solve(inv[k][np.ix_(idx, idx)], wb[k, idx])
            want[k] = wb[k] - inv[k][:, idx] @ z
    want[q] = 0.0
    got = _np_blocks(new["w"], 4)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert np.all(got[q] == 0.0)
    assert new["w"].dtype == params["w"].dtype and new["w"].shape == params["w"].shape


def test_single_weight_ranking_is_brute_force_optimum():
    params, grads = _setup(2, 5, shape=(4, 8))
    b = 8
    fisher = _np_fisher(grads["w"], b)
    finv = obs.block_fisher_inverse(grads, block_size=b, damping=DAMPING)
    s = _np_blocks(obs.obs_scores(params, finv)["w"], b)
    wb = _np_blocks(params["w"], b)
    for k in range(len(wb)):
        cost = []
        for q in range(b):  # remove q, minimise 0.5 dw^T F dw over the rest (KKT, no inverse of F)
            r = [i for i in range(b) if i != q]
            dw = np.zeros(b)
            dw[q] = -wb[k, q]
            dw[r] = -np.linalg.solve(fisher[k][np.ix_(r, r)], fisher[k][r, q] * dw[q])
            cost.append(0.5 * dw @ fisher[k] @ dw)
        np.testing.assert_allclose(s[k], cost, rtol=2e-3)
        assert int(np.argmin(s[k])) == int(np.argmin(cost))


def test_block_size_one_is_obd_without_update():
    params, grads = _setup(3, 7)
    finv = obs.block_fisher_inverse(grads, block_size=1, damping=DAMPING)
    diag = {"w": jnp.mean(jnp.asarray(grads["w"]) ** 2, axis=0) + DAMPING}
    np.testing.assert_allclose(
        obs.obs_scores(params, finv)["w"], fo.saliency(params, diag)["w"], rtol=1e-5
    )
    new, keep = obs.obs_prune(params, finv, 0.6)
    np.testing.assert_array_equal(keep["w"], fo.select(fo.saliency(params, diag), 0.6)["w"])
    np.testing.assert_array_equal(new["w"], np.where(keep["w"], params["w"], 0.0))


def test_beats_magnitude_without_update_on_a_quadratic():
    # Correlated gradients: a random quadratic 0.5 dw^T F dw with strong off-diagonal terms.
    rng = np.random.default_rng(4)
    mix = rng.normal(size=(16, 16))
    g = (rng.normal(size=(40, 16)) @ mix).astype(np.float32)[:, None, :]  # leaf (1, 16)
    params = {"w": rng.normal(size=(1, 16)).astype(np.float32)}
    fisher = _np_fisher(g, 16)[0]
    finv = obs.block_fisher_inverse({"w": g}, block_size=16, damping=DAMPING)
    new, _ = obs.obs_prune(params, finv, 0.5)
    keep_mag = fo.magnitude_mask(params, 0.5)
    w = np.ravel(params["w"]).astype(np.float64)
    d_obs = np.ravel(new["w"]) - w
    d_mag = np.where(np.ravel(keep_mag["w"]), w, 0.0) - w
    loss_obs, loss_mag = 0.5 * d_obs @ fisher @ d_obs, 0.5 * d_mag @ fisher @ d_mag
    assert loss_obs < loss_mag


def test_mask_and_prunable_are_honoured():
    params, grads = _setup(5, 4)
    params["b"] = np.ones(5, np.float32)
    grads["b"] = np.ones((4, 5), np.float32)
    finv = obs.block_fisher_inverse(grads, block_size=4, damping=DAMPING)
    prior = {"w": np.ones((3, 5), bool), "b": np.ones(5, bool)}
    prior["w"][0, :3] = False
    pruned_params = {"w": np.where(prior["w"], params["w"], 0.0), "b": params["b"]}
    new, keep = obs.obs_prune(pruned_params, finv, 0.6, mask=prior)
    assert not np.any(keep["w"][0, :3]) and int((~keep["w"]).sum()) == 9
    assert np.all(np.asarray(new["w"])[~np.asarray(keep["w"])] == 0.0)
    np.testing.assert_array_equal(new["b"], params["b"])  # not a kernel: not pruned, no update
    assert bool(keep["b"].all())


def test_jit_matches_eager_and_does_not_recompile():
    params, grads = _setup(6, 3)
    finv = obs.block_fisher_inverse(grads, block_size=4, damping=DAMPING)
    traces = []

    @jax.jit
    def prune(p, f, s):
        traces.append(None)
        return obs.obs_prune(p, f, s)

    for s in (0.3, 0.7):
        got, got_keep = prune(params, finv, jnp.float32(s))
        want, want_keep = obs.obs_prune(params, finv, s)
        np.testing.assert_array_equal(got_keep["w"], want_keep["w"])
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


def test_per_example_grads_matches_a_loop_and_chunks():
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "y": jnp.arange(6) % 2}

    def loss(p, b):
        logits = b["x"] @ p["w"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(b["y"])), b["y"]])

    want = np.stack(
        [
            jax.grad(loss)(params, jax.tree.map(lambda a, i=i: a[i : i + 1], batch))["w"]
            for i in range(6)
        ]
    )
    np.testing.assert_allclose(obs.per_example_grads(loss, params, batch)["w"], want, rtol=1e-5)
    chunked = obs.per_example_grads(loss, params, batch, chunk=3)["w"]
    np.testing.assert_allclose(chunked, want, rtol=1e-5)


def test_errors():
    params, grads = _setup(8, 3)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        obs.block_fisher_inverse(grads, block_size=4, damping=0.0)
    with pytest.raises(ValueError, match="block_size"):
        obs.block_fisher_inverse(grads, block_size=0, damping=0.1)
    with pytest.raises(ValueError, match="disagree on the number of gradients m"):
        obs.block_fisher_inverse(
            {"a": np.ones((2, 3)), "b": np.ones((3, 3))}, block_size=2, damping=0.1
        )
    with pytest.raises(ValueError, match="is a scalar; every leaf needs a leading axis"):
        obs.block_fisher_inverse({"a": np.float32(1.0)}, block_size=2, damping=0.1)
    finv = obs.block_fisher_inverse(grads, block_size=4, damping=0.1)
    with pytest.raises(
        ValueError, match=r"finv at \['w'\] has shape \(4, 4, 4\); for a leaf of 20"
    ):
        obs.obs_scores({"w": np.ones((4, 5), np.float32)}, finv)
    with pytest.raises(ValueError, match="finv must have the structure of params"):
        obs.obs_prune({"v": params["w"]}, finv, 0.5)
    with pytest.raises(ValueError, match="chunk=4 does not divide the batch of 6"):
        obs.per_example_grads(lambda p, b: jnp.sum(p * b), jnp.ones(()), jnp.ones(6), chunk=4)


# ---------------------------------------------------------------------------------------------
# BlockOBS as the criterion of pruned: the buffer, the selection and the update while training


def _stream(seed, steps, shape):
    rng = np.random.default_rng(seed)
    params = {"kernel": rng.normal(size=shape).astype(np.float32), "bias": np.zeros(3, np.float32)}
    grads = [
        {"kernel": rng.normal(size=shape).astype(np.float32), "bias": np.ones(3, np.float32)}
        for _ in range(steps)
    ]
    return params, grads


def _run(opt, params, grads, step=None):
    step = step or opt.update
    state = opt.init(params)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_pruned_block_obs_equals_obs_prune_at_each_mask_update():
    # sgd(0): the inner optimizer moves nothing, so params change only by the OBS updates.
    # m = 4 gradients, updates at steps 2 (3 gradients held: the partly filled buffer) and
    # 4 (gradients 1..4: the ring has wrapped).
    params, grads = _stream(10, 5, (3, 6))
    targets = lambda t: jnp.where(t >= 4, 0.5, jnp.where(t >= 2, 0.25, 0.0))
    surgeon = obs.BlockOBS(block_size=4, num_grads=4, damping=DAMPING)
    opt = fo.pruned(optax.sgd(0.0), targets, criterion=surgeon, method="one_stage", update_every=2)
    want, mask = dict(params), None
    for held, t in ((grads[:3], 2), (grads[1:5], 4)):
        stacked = jax.tree.map(lambda *g: jnp.stack(g), *held)
        finv = obs.block_fisher_inverse(stacked, block_size=4, damping=DAMPING)
        want, mask = obs.obs_prune(want, finv, float(targets(t)), mask=mask)
    got, state = _run(opt, params, grads)
    np.testing.assert_array_equal(state.mask["kernel"], mask["kernel"])
    assert int((~state.mask["kernel"]).sum()) == 9  # round(0.5 * 18): select's count
    np.testing.assert_allclose(got["kernel"], want["kernel"], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got["kernel"])[~np.asarray(mask["kernel"])] == 0.0)
    assert not np.allclose(
        np.asarray(got["kernel"])[np.asarray(mask["kernel"])],
        params["kernel"][np.asarray(mask["kernel"])],
    )  # survivors moved
    np.testing.assert_array_equal(got["bias"], params["bias"])  # not prunable: not moved
    assert int(state.gradients.count) == 5
    np.testing.assert_array_equal(state.gradients.grads["kernel"][0], grads[4]["kernel"])


def test_pruned_block_obs_with_block_size_one_is_obd_without_update():
    params, grads = _stream(11, 3, (4, 5))
    surgeon = obs.BlockOBS(block_size=1, num_grads=3, damping=DAMPING)
    opt = fo.pruned(optax.sgd(0.0), lambda t: jnp.where(t >= 2, 0.6, 0.0), criterion=surgeon,
                    method="one_stage", update_every=2)  # fmt: skip
    got, state = _run(opt, params, grads)
    diag = {k: np.mean(np.stack([g[k] for g in grads]) ** 2, axis=0) + DAMPING for k in params}
    want = fo.select(fo.saliency(params, diag), 0.6)
    np.testing.assert_array_equal(state.mask["kernel"], want["kernel"])
    np.testing.assert_array_equal(got["kernel"], np.where(want["kernel"], params["kernel"], 0.0))


def test_pruned_block_obs_jit_matches_eager_and_compiles_once():
    params, grads = _stream(12, 5, (2, 8))
    params, grads = {"kernel": params["kernel"]}, [{"kernel": g["kernel"]} for g in grads]
    surgeon = obs.BlockOBS(block_size=8, num_grads=3, damping=DAMPING)
    opt = fo.pruned(optax.adam(1e-2), fo.polynomial_sparsity(0.75, begin_step=0, end_step=4),
                    criterion=surgeon, update_every=2)  # fmt: skip
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(None)
        return opt.update(g, s, p)

    jitted, s_jit = _run(opt, params, grads, step)
    eager, s_eager = _run(opt, params, grads)
    assert len(traces) == 1
    np.testing.assert_array_equal(s_jit.mask["kernel"], s_eager.mask["kernel"])
    assert int((~s_jit.mask["kernel"]).sum()) == 12  # two-stage, 0.75 of 16 at step 4
    np.testing.assert_allclose(jitted["kernel"], eager["kernel"], rtol=1e-5, atol=1e-6)


def test_gradient_buffer_keeps_the_last_m_and_its_inverse_averages_what_it_holds():
    params, grads = _stream(13, 3, (2, 3))
    opt = optax.chain(obs.gradient_buffer(5), optax.sgd(0.1))
    state = opt.init(params)
    updates, state = opt.update(grads[0], state, params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * grads[0]["kernel"])  # passed on
    for g in grads[1:]:
        _, state = opt.update(g, state, params)
    finv = obs.buffer_fisher_inverse(state[0], block_size=4, damping=DAMPING)
    want = np.linalg.inv(_np_fisher(np.stack([g["kernel"] for g in grads]), 4))
    np.testing.assert_allclose(finv["kernel"], want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_block_obs_errors():
    with pytest.raises(ValueError, match=r"block_size must be an int >= 1, got 0\. It is the"):
        obs.BlockOBS(block_size=0, num_grads=4, damping=0.1)
    with pytest.raises(TypeError, match=r"num_grads must be an int >= 1, got 2\.5"):
        obs.BlockOBS(block_size=4, num_grads=2.5, damping=0.1)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        obs.BlockOBS(block_size=4, num_grads=4, damping=float("nan"))
    with pytest.raises(ValueError, match=r"num_grads must be an int >= 1, got 0\. It is the"):
        obs.gradient_buffer(0)
    with pytest.raises(TypeError, match="state must be the GradientBufferState"):
        obs.buffer_fisher_inverse(optax.EmptyState(), block_size=2, damping=0.1)
    with pytest.raises(ValueError, match="key is only used by criterion='random'"):
        fo.pruned(optax.sgd(0.1), 0.5, criterion=obs.BlockOBS(4, 4, 0.1), key=jax.random.key(0))
