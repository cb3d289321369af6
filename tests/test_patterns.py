"""N:M and block masks against NumPy loop references, under jit, in
``pruned``, nested with unstructured masks, and on params sharded over 8 CPU devices."""

import dataclasses
import functools
import itertools
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fisher_optax as fo

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def k_of(sparsity, n):
    """select's documented count: exact product of the float32 sparsity, half to even."""
    return round(Fraction(float(np.float32(sparsity))) * n)


# ------------------------------------------------------------------------------------------
# NumPy references: plain loops over groups and blocks, Python sorts.


def groups_of(shape, axis, m):
    """Flat indices of every group of m consecutive entries along axis, in flat order."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    idx = np.moveaxis(idx, axis, -1)
    return idx.reshape(-1, m)


def ref_nm(score, n, m, axis, prior=None):
    """Keep-mask: per group the n best (pruned by prior lose; ties: higher flat index wins)."""
    s = np.asarray(score, np.float32).ravel()
    alive = np.ones(s.size, bool) if prior is None else np.asarray(prior).ravel().copy()
    keep = np.zeros(s.size, bool)
    for group in groups_of(np.shape(score), axis, m):
        ranked = sorted(group, key=lambda i: (alive[i], s[i], i), reverse=True)
        keep[ranked[:n]] = True
    return (keep & alive).reshape(np.shape(score))


def ref_nm_gradual(scores, n, m, axis, sparsity, scope, prior=None):
    """Prune max(round(min(s, c) N), p) in scope, never one of a group's n best; the pattern
    itself at s >= c."""
    names = list(scores)
    cap = np.float32((m - n) / m)
    prior = prior or {k: np.ones(np.shape(v), bool) for k, v in scores.items()}
    final = {k: ref_nm(scores[k], n, m, axis, prior[k]) for k in names}
    scopes = [names] if scope == "global" else [[k] for k in names]
    out = {}
    for leaves in scopes:
        s = np.concatenate([np.asarray(scores[k], np.float32).ravel() for k in leaves])
        alive = np.concatenate([np.asarray(prior[k]).ravel() for k in leaves])
        win = np.concatenate([final[k].ravel() for k in leaves])
        if np.float32(sparsity) >= cap:
            keep = win
        else:
            k = max(k_of(min(np.float32(sparsity), cap), s.size), int((~alive).sum()))
            candidates = sorted((s[i], i) for i in range(s.size) if alive[i] and not win[i])
            keep = alive.copy()
            for _, i in candidates[: k - int((~alive).sum())]:
                keep[i] = False
        start = 0
        for name in leaves:
            size = int(np.prod(np.shape(scores[name])))
            out[name] = keep[start : start + size].reshape(np.shape(scores[name]))
            start += size
    return out


def ref_blocks(score, r, c, reduce, prior):
    """Per block (row-major over leading index, block row, block col): its flat entries,
    score over the entries prior keeps, and whether it keeps any."""
    shape = np.shape(score)
    h, w = shape[-2:]
    lead = int(np.prod(shape[:-2]))
    s = np.asarray(score, np.float32).reshape(lead, h, w)
    kept = np.asarray(prior).reshape(lead, h, w)
    idx = np.arange(lead * h * w).reshape(lead, h, w)
    out = []
    for t in range(lead):
        for i in range(0, h, r):
            for j in range(0, w, c):
                vals = s[t, i : i + r, j : j + c][kept[t, i : i + r, j : j + c]]
                entries = idx[t, i : i + r, j : j + c].ravel()
                if vals.size == 0:
                    out.append((entries, np.float32(0), False))
                elif reduce == "sum":
                    out.append((entries, np.float32(vals.sum(dtype=np.float32)), True))
                elif reduce == "mean":
                    mean = np.float32(vals.sum(dtype=np.float32)) / np.float32(vals.size)
                    out.append((entries, mean, True))
                else:
                    out.append((entries, np.float32(vals.max()), True))
    return out


def ref_block_mask(scores, sparsity, r, c, reduce, scope, prior=None):
    names = list(scores)
    prior = prior or {k: np.ones(np.shape(v), bool) for k, v in scores.items()}
    blocks = {k: ref_blocks(scores[k], r, c, reduce, prior[k]) for k in names}
    scopes = [names] if scope == "global" else [[k] for k in names]
    out = {}
    for leaves in scopes:
        items = [(k, b) for k in leaves for b in blocks[k]]
        already = sum(not b[2] for _, b in items)
        k = max(k_of(sparsity, len(items)), already)
        # Blocks with nothing kept first, then by score, then by position in the ranking.
        order = sorted(range(len(items)), key=lambda i: (items[i][1][2], items[i][1][1], i))
        for name in leaves:
            out[name] = np.asarray(prior[name]).copy().ravel()
        for i in order[:k]:
            name, (entries, _, _) = items[i]
            out[name][entries] = False
        for name in leaves:
            out[name] = out[name].reshape(np.shape(scores[name]))
    return out


def int_scores(rng, shapes):
    return {f"l{i}": rng.integers(-3, 4, size=s).astype(np.float32) for i, s in enumerate(shapes)}


def random_prior(rng, scores, p=0.25):
    return {k: rng.uniform(size=np.shape(v)) > p for k, v in scores.items()}


def as_jnp(tree):
    return {k: jnp.asarray(v) for k, v in tree.items()}


def assert_tree_equal(got, want):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


# Two fixed layouts: every new layout compiles the selection kernel again.
NM_LAYOUTS = [[(8, 4), (2, 8, 8)], [(16, 2)]]


# ------------------------------------------------------------------------------------------
# N:M


@SETTINGS
@given(
    layout=st.sampled_from(NM_LAYOUTS),
    m=st.sampled_from([1, 2, 4]),
    n_frac=st.floats(0, 1),
    axis=st.sampled_from([-2, -1, 0]),
    with_prior=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_full_pattern_matches_loop_reference_exact_per_group(
    layout, m, n_frac, axis, with_prior, seed
):
    if axis == -1 and any(s[-1] % m for s in layout):
        m = 2  # every axis -1 length here is even
    n = max(1, round(n_frac * m))
    rng = np.random.default_rng(seed)
    scores = int_scores(rng, layout)
    prior = random_prior(rng, scores) if with_prior else None
    got = fo.select(
        as_jnp(scores),
        1.0,
        pattern=fo.NM(n, m, axis=axis),
        mask=None if prior is None else as_jnp(prior),
    )
    for k, s in scores.items():
        want = ref_nm(s, n, m, axis, None if prior is None else prior[k])
        np.testing.assert_array_equal(np.asarray(got[k]), want, err_msg=k)
        alive = np.ones(s.shape, bool) if prior is None else prior[k]
        kept = np.asarray(got[k]).ravel()[groups_of(s.shape, axis, m)].sum(1)
        np.testing.assert_array_equal(
            kept, np.minimum(n, alive.ravel()[groups_of(s.shape, axis, m)].sum(1))
        )


def test_nm_ties_go_to_the_lower_flat_index_first():
    scores = {"w": jnp.zeros((4, 2))}
    got = np.asarray(
        fo.select(scores, 1.0, pattern=fo.NM(2, 4, axis=-2))["w"]
    )  # all tied: the last two of each column stay
    np.testing.assert_array_equal(got, [[False, False], [False, False], [True, True], [True, True]])
    got = np.asarray(fo.select(scores, 1.0, pattern=fo.NM(1, 2, axis=-1))["w"])
    np.testing.assert_array_equal(got, [[False, True]] * 4)
    # -0.0 ties with 0.0; inf ranks above every number.
    got = fo.select(
        {"w": jnp.array([[0.0], [-0.0], [jnp.inf], [-jnp.inf]])}, 1.0, pattern=fo.NM(2, 4, axis=-2)
    )["w"]
    np.testing.assert_array_equal(np.asarray(got).ravel(), [False, True, True, False])


# Each drawn configuration compiles once; its sparsities and seeds reuse the compiled core.
FEW = settings(max_examples=6, deadline=None, derandomize=True)
three_sparsities = st.lists(st.floats(0, 1), min_size=3, max_size=3)


@FEW
@given(
    layout=st.sampled_from(NM_LAYOUTS),
    nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (1, 2)]),
    sparsities=three_sparsities,
    scope=st.sampled_from(["layer", "global"]),
    with_prior=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_gradual_matches_loop_reference(layout, nm, sparsities, scope, with_prior, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    pattern = fo.NM(n, m, scope=scope, axis=-2)
    for sparsity in [*sparsities, (m - n) / m]:
        scores = int_scores(rng, layout)
        prior = random_prior(rng, scores, 0.15) if with_prior else None
        mask = None if prior is None else as_jnp(prior)
        got = fo.select(as_jnp(scores), sparsity, pattern=pattern, mask=mask)
        assert_tree_equal(got, ref_nm_gradual(scores, n, m, -2, sparsity, scope, prior))
        # No group loses more than m - n weights beyond what the prior pruned.
        for k, s in scores.items():
            g = groups_of(s.shape, -2, m)
            alive = np.ones(s.shape, bool) if prior is None else prior[k]
            lost = (alive.ravel()[g] & ~np.asarray(got[k]).ravel()[g]).sum(1)
            assert lost.max() <= m - n


def test_nm_counts_follow_the_target_and_end_at_the_pattern():
    rng = np.random.default_rng(3)
    scores = {"a": jnp.asarray(rng.standard_normal((64, 6)), jnp.float32)}
    nm = fo.NM(2, 4, axis=-2)
    final = fo.select(scores, 1.0, pattern=nm)
    traced = jax.jit(lambda scores, s: fo.select(scores, s, pattern=nm))
    for s in [0.0, 0.1, 0.3, 0.49]:
        assert int((~fo.select(scores, s, pattern=nm)["a"]).sum()) == k_of(s, 384)
    for s in [0.5, 0.7, 1.0]:  # the cap: no more than the pattern
        assert_tree_equal(fo.select(scores, s, pattern=nm), final)
        assert_tree_equal(traced(scores, jnp.float32(s)), final)  # through the top-k path
    # 1:3 has a cap (2/3) that float32 cannot hold: the end is still the exact pattern.
    scores3 = {"a": jnp.asarray(rng.standard_normal((3 * 50, 2)), jnp.float32)}
    assert_tree_equal(
        fo.select(scores3, 2 / 3, pattern=fo.NM(1, 3, axis=-2)),
        fo.select(scores3, 1.0, pattern=fo.NM(1, 3, axis=-2)),
    )


def test_nm_per_leaf_targets_and_elementwise_prunable():
    rng = np.random.default_rng(4)
    scores = {"a": jnp.asarray(rng.standard_normal((8, 4))), "b": jnp.asarray(rng.random((4, 4)))}
    got = fo.select(scores, {"['a']": 0.25}, pattern=fo.NM(2, 4, axis=-2))
    assert int((~got["a"]).sum()) == 8 and bool(got["b"].all())
    # A group holding a protected weight is left as it is; the others get 2:4.
    allowed = {"a": np.ones((8, 4), bool), "b": np.ones((4, 4), bool)}
    allowed["a"][1, 2] = False
    got = fo.select(scores, 1.0, pattern=fo.NM(2, 4, axis=-2), prunable=allowed)
    assert bool(got["a"][:4, 2].all())
    np.testing.assert_array_equal(
        np.asarray(got["a"][4:, 2]), ref_nm(scores["a"][4:, 2:3], 2, 4, 0).ravel()
    )
    assert int((~got["a"]).sum()) == 2 * 7 and int((~got["b"]).sum()) == 2 * 4
    # Non-prunable leaves (the default: ndim < 2) stay dense.
    assert bool(
        fo.select({"w": jnp.ones((4, 4)), "b": jnp.ones(3)}, 1.0, pattern=fo.NM(1, 4, axis=-2))[
            "b"
        ].all()
    )


def test_nm_from_fisher_scores_and_keep_pruned():
    params = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((8, 4)), jnp.float32)}
    fisher = jax.tree.map(lambda w: w**2 + 0.5, params)
    mask = fo.select(
        fo.scores(params, "saliency", fisher=fisher), 1.0, pattern=fo.NM(2, 4, axis=-2)
    )
    opt = optax.chain(optax.adamw(0.1, weight_decay=0.1), fo.keep_pruned(mask))
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
        params = optax.apply_updates(params, updates)
    nonzero = (np.asarray(params["w"]) != 0).ravel()[groups_of((8, 4), 0, 4)].sum(1)
    assert nonzero.max() == 2


# ------------------------------------------------------------------------------------------
# Blocks


BLOCK_LAYOUTS = [[(6, 8), (2, 4, 6)], [(5, 7)]]


@FEW
@given(
    layout=st.sampled_from(BLOCK_LAYOUTS),
    block=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    reduce=st.sampled_from(["sum", "mean", "max"]),
    sparsities=three_sparsities,
    scope=st.sampled_from(["global", "layer"]),
    with_prior=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_blocks_match_loop_reference(layout, block, reduce, sparsities, scope, with_prior, seed):
    rng = np.random.default_rng(seed)
    for sparsity in sparsities:
        scores = int_scores(rng, layout)
        prior = random_prior(rng, scores, 0.4) if with_prior else None
        got = fo.select(
            as_jnp(scores),
            sparsity,
            pattern=fo.Blocks(block, reduction=reduce, scope=scope, axes=(-2, -1)),
            mask=None if prior is None else as_jnp(prior),
        )
        assert_tree_equal(got, ref_block_mask(scores, sparsity, *block, reduce, scope, prior))


def test_block_exact_count_ties_and_partial_edge_blocks():
    # 3 x 5 with (2, 2) blocks: a 2 x 3 grid whose last row and column are partial.
    scores = {"w": jnp.ones((3, 5))}
    got = np.asarray(
        fo.select(scores, 0.5, pattern=fo.Blocks((2, 2), reduction="mean", axes=(-2, -1)))["w"]
    )
    # All block means tie at 1: the 3 blocks of lower flat index (the top row) go.
    np.testing.assert_array_equal(got, np.array([[0] * 5, [0] * 5, [1] * 5], bool))
    # With "sum" the smaller edge blocks score less and go first: (1, 2) holds 1 weight.
    got = np.asarray(fo.select(scores, 1 / 6, pattern=fo.Blocks((2, 2), axes=(-2, -1)))["w"])
    assert (~got).sum() == 1 and not got[2, 4]


def test_block_prior_mask_counts_and_nests():
    scores = {"w": jnp.arange(16.0).reshape(4, 4)}
    prior = np.ones((4, 4), bool)
    prior[2:, 2:] = False  # the best block is already empty: it counts as pruned
    prior[0, 0] = False
    got = np.asarray(
        fo.select(
            scores, 0.25, pattern=fo.Blocks((2, 2), axes=(-2, -1)), mask={"w": jnp.asarray(prior)}
        )["w"]
    )
    np.testing.assert_array_equal(got, prior)  # target 1 block: already met
    got = np.asarray(
        fo.select(
            scores, 0.5, pattern=fo.Blocks((2, 2), axes=(-2, -1)), mask={"w": jnp.asarray(prior)}
        )["w"]
    )
    want = prior.copy()
    want[:2, :2] = False  # then the block of smallest sum among the kept weights
    np.testing.assert_array_equal(got, want)


def test_block_elementwise_prunable_and_per_leaf_targets():
    scores = {"a": jnp.arange(16.0).reshape(4, 4), "b": jnp.ones((2, 2))}
    allowed = {"a": np.ones((4, 4), bool), "b": True}
    allowed["a"][0, 1] = False  # the worst block holds a protected weight: the next goes
    got = fo.select(
        scores, 0.25, pattern=fo.Blocks((2, 2), scope="layer", axes=(-2, -1)), prunable=allowed
    )
    want = np.ones((4, 4), bool)
    want[:2, 2:] = False
    np.testing.assert_array_equal(np.asarray(got["a"]), want)
    got = fo.select(scores, {"a": 0.5, "b": 0.0}, pattern=fo.Blocks((2, 2), axes=(-2, -1)))
    assert int((~got["a"]).sum()) == 8 and bool(got["b"].all())


# ------------------------------------------------------------------------------------------
# Under jit, in pruned


def test_selections_under_jit_match_eager_and_compile_once():
    rng = np.random.default_rng(6)
    scores = {"a": jnp.asarray(rng.integers(0, 4, (8, 6)), jnp.float32), "b": jnp.ones((4, 4))}
    prior = jax.tree.map(lambda x: jnp.asarray(rng.uniform(size=x.shape) > 0.1), scores)
    for pattern in [fo.NM(2, 4, axis=-2), fo.Blocks((2, 3), reduction="max", axes=(-2, -1))]:
        traces = []

        @jax.jit
        def f(scores, s, prior, pattern=pattern, traces=traces):
            traces.append(1)
            return fo.select(scores, s, pattern=pattern, mask=prior)

        for s in [0.0, 0.2, 0.37, 0.5, 0.9]:
            want = fo.select(scores, s, pattern=pattern, mask=prior)
            assert_tree_equal(f(scores, jnp.float32(s), prior), want)
        assert len(traces) == 1
    jitted = jax.jit(lambda s: fo.select(s, 1.0, pattern=fo.NM(2, 4, axis=-2)))(scores)
    assert_tree_equal(jitted, fo.select(scores, 1.0, pattern=fo.NM(2, 4, axis=-2)))


def test_traced_nan_scores_never_prune_a_group_winner():
    scores = {"w": jnp.array([[jnp.nan], [1.0], [2.0], [3.0]])}
    got = jax.jit(lambda s, t: fo.select(s, t, pattern=fo.NM(2, 4, axis=-2)))(
        scores, jnp.float32(0.5)
    )["w"]
    np.testing.assert_array_equal(np.asarray(got).ravel(), [True, False, False, True])
    got = jax.jit(lambda s, t: fo.select(s, t, pattern=fo.NM(1, 4, axis=-2)))(
        scores, jnp.float32(0.74)
    )["w"]
    assert bool(got[0, 0])  # NaN ranks above every number: its group's winner


def test_pruned_grows_nm_and_blocks_on_a_schedule():
    rng = np.random.default_rng(7)
    params = {
        "w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
        "b": jnp.zeros(8),
    }
    schedule = fo.polynomial_sparsity(0.5, begin_step=0, end_step=6, power=1)
    for pattern, method in [
        (fo.NM(2, 4, axis=-2), "one_stage"),
        (fo.Blocks((4, 2), axes=(-2, -1)), "two_stage"),
    ]:
        opt = fo.pruned(
            optax.adam(1e-2),
            schedule,
            criterion="magnitude",
            method=method,
            update_every=2,
            pattern=pattern,
        )
        state = opt.init(params)
        step = jax.jit(lambda p, s, opt=opt: opt.update(jax.tree.map(jnp.sin, p), s, p))
        p, pruned_counts, masks = params, [], []
        for _ in range(8):
            updates, state = step(p, state)
            p = optax.apply_updates(p, updates)
            pruned_counts.append(int((~state.mask["w"]).sum()))
            masks.append(np.asarray(state.mask["w"]))
        # Updates at steps 0, 2, 4, 6: targets 0, 1/6, 1/3, 1/2 of 128 weights (or 16 blocks).
        if method == "one_stage":
            assert pruned_counts[::2] == [0, k_of(1 / 6, 128), k_of(1 / 3, 128), 64]
            per_group = masks[-1].ravel()[groups_of((16, 8), 0, 4)].sum(1)
            assert (per_group == 2).all()
        else:
            assert pruned_counts[::2] == [0, 8 * k_of(1 / 6, 16), 8 * k_of(1 / 3, 16), 64]
            blocks = masks[-1].reshape(4, 4, 4, 2).all(axis=(1, 3)) | ~masks[-1].reshape(
                4, 4, 4, 2
            ).any(axis=(1, 3))
            assert blocks.all()  # whole blocks only
        for a, b in itertools.pairwise(masks):
            assert not (b & ~a).any()  # masks only grow
        assert (np.asarray(p["w"])[~masks[-1]] == 0).all()
        assert bool(state.mask["b"].all())


# ------------------------------------------------------------------------------------------
# Sharded: 8 CPU devices (root conftest), no gather


COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (root conftest XLA_FLAGS)")
def test_sharded_selections_match_reference_without_gathers():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(8)
    specs = {"a": ((64, 32), P("data", "model")), "c": ((128, 16), P(("data", "model"), None))}
    scores, prior = {}, {}
    for k, (shape, spec) in specs.items():
        sharding = NamedSharding(mesh, spec)
        scores[k] = jax.device_put(jnp.asarray(rng.integers(0, 9, shape), jnp.float32), sharding)
        prior[k] = jax.device_put(jnp.asarray(rng.uniform(size=shape) > 0.1), sharding)
    host = jax.tree.map(np.asarray, (scores, prior))
    # N:M groups down the rows of "a" (32 rows a shard), 4 x 4 blocks of "c" (16 rows a shard).
    nm = (fo.NM(2, 4, axis=-2), {"a": True, "c": False})
    blocks = (fo.Blocks((4, 4), reduction="mean", axes=(-2, -1)), {"a": False, "c": True})
    cases = [
        (nm, "a", lambda s, p: ref_nm_gradual(s, 2, 4, -2, 0.3, "layer", p)),
        (blocks, "c", lambda s, p: ref_block_mask(s, 0.3, 4, 4, "mean", "global", p)),
    ]
    for (pattern, prunable), name, ref in cases:
        compiled = (
            jax.jit(
                lambda s, t, p, pattern=pattern, prunable=prunable: fo.select(
                    s, t, pattern=pattern, prunable=prunable, mask=p
                )
            )
            .lower(scores, jnp.float32(0.3), prior)
            .compile()
        )
        got = compiled(scores, jnp.float32(0.3), prior)
        want = ref({name: host[0][name]}, {name: host[1][name]})
        np.testing.assert_array_equal(np.asarray(got[name]), want[name])
        assert (~want[name]).sum() > (~host[1][name]).sum()  # it did prune
        assert got[name].sharding.is_equivalent_to(scores[name].sharding, 2)
        text = compiled.as_text()
        found = {c: len(re.findall(rf"\b{c}(-start)?\(", text)) for c in COLLECTIVES}
        assert found == dict.fromkeys(COLLECTIVES, 0), found


# ------------------------------------------------------------------------------------------
# Errors


def test_nm_errors_by_message():
    scores = {"w": jnp.ones((6, 4))}
    with pytest.raises(ValueError, match=r"groups of m=4 do not tile axis -2 .*\['w'\].*length 6"):
        fo.select(scores, 1.0, pattern=fo.NM(2, 4, axis=-2))
    with pytest.raises(ValueError, match=r"axis=2 is out of range .*\['w'\] of shape \(6, 4\)"):
        fo.select(scores, 1.0, pattern=fo.NM(2, 4, axis=2))
    with pytest.raises(ValueError, match=r"n \(the weights kept in each group of m=4\) .*1\.\.4"):
        fo.select(scores, 1.0, pattern=fo.NM(5, 4, axis=-1))
    with pytest.raises(ValueError, match=r"n \(.*\) must be an int in 1\.\.4, got 0"):
        fo.NM(0, 4, axis=-2)
    with pytest.raises(TypeError, match="m must be an int >= 1"):
        fo.select(scores, 1.0, pattern=fo.NM(2, 4.0, axis=-2))
    with pytest.raises(TypeError, match=r"axis must be an int .* or None"):
        fo.NM(2, 4, axis="in")
    with pytest.raises(ValueError, match=r"NM has no default axis for the leaf at \['w'\].*axis="):
        fo.select(scores, 1.0, pattern=fo.NM(2, 4))
    with pytest.raises(ValueError, match="scope must be one of"):
        fo.NM(2, 4, scope="row", axis=-2)
    with pytest.raises(ValueError, match=r"scores at \['w'\] hold NaN"):
        fo.select({"w": jnp.full((4, 4), jnp.nan)}, 1.0, pattern=fo.NM(2, 4, axis=-2))
    with pytest.raises(TypeError, match=r"mask at \['w'\] has dtype float32"):
        fo.select(scores, 1.0, pattern=fo.NM(2, 4, axis=-1), mask={"w": jnp.ones((6, 4))})
    with pytest.raises(ValueError, match=r"mask at \['w'\] has shape \(4, 4\)"):
        fo.select(scores, 0.5, pattern=fo.NM(2, 4, axis=-1), mask={"w": jnp.ones((4, 4), bool)})
    with pytest.raises(ValueError, match=r"sparsity must be a finite number in \[0\.0, 1\.0\]"):
        fo.select(scores, 1.5, pattern=fo.NM(2, 4, axis=-1))
    # A leaf left out by prunable is not checked.
    assert bool(
        fo.select(scores, 1.0, pattern=fo.NM(2, 4, axis=-2), prunable=lambda p, x: False)["w"].all()
    )


def test_block_errors_by_message():
    scores = {"w": jnp.ones((4, 4))}
    with pytest.raises(TypeError, match=r"shape must be a pair of ints \(rows, columns\)"):
        fo.select(scores, 0.5, pattern=fo.Blocks(4))
    with pytest.raises(TypeError, match="shape must be a pair of ints"):
        fo.Blocks((2.0, 2))
    with pytest.raises(ValueError, match=r"block sizes must be >= 1, got shape=\(0, 2\)"):
        fo.select(scores, 0.5, pattern=fo.Blocks((0, 2)))
    with pytest.raises(ValueError, match="reduction must be one of: 'sum'"):
        fo.Blocks((2, 2), reduction="median")
    with pytest.raises(ValueError, match=r"tile two axes .*\['b'\] has shape \(4,\)"):
        fo.select({"b": jnp.ones(4)}, 0.5, pattern=fo.Blocks((2, 2)), prunable=lambda p, x: True)
    with pytest.raises(ValueError, match=r"scores at \['w'\] hold NaN"):
        fo.select({"w": jnp.full((4, 4), jnp.nan)}, 0.5, pattern=fo.Blocks((2, 2)))
    with pytest.raises(TypeError, match=r"scores at \['w'\] have dtype bool"):
        fo.select({"w": jnp.ones((4, 4), bool)}, 0.5, pattern=fo.Blocks((2, 2)))
    with pytest.raises(ValueError, match="sparsity names the path"):
        fo.select(scores, {"['x']": 0.5}, pattern=fo.Blocks((2, 2)))


# ------------------------------------------------------------------------------------------
# Pattern values and the one selection call


def test_non_prunable_weights_keep_what_mask_pruned_in_every_pattern():
    """One rule for every pattern: a leaf that is not prunable is True unless mask pruned it
    (the full N:M pattern and blocks returned it all True before)."""
    scores = {"b": jnp.ones(4), "w": jnp.arange(16.0).reshape(4, 4)}
    prior = {"b": jnp.array([True, False, True, True]), "w": jnp.ones((4, 4), bool)}
    for pattern, sparsity in [
        (fo.Unstructured(), 0.5),
        (fo.NM(2, 4, axis=-2), 1.0),
        (fo.NM(2, 4, axis=-2), 0.25),
        (fo.Blocks((2, 2), axes=(-2, -1)), 0.5),
    ]:
        got = fo.select(scores, sparsity, pattern=pattern, mask=prior)
        np.testing.assert_array_equal(np.asarray(got["b"]), np.asarray(prior["b"]), str(pattern))
        assert int((~got["w"]).sum()) == (8 if sparsity >= 0.5 else 4), pattern


def test_patterns_are_immutable_hashable_values_checked_at_construction():
    assert fo.NM(2, 4, axis=-2) == fo.NM(2, 4, axis=-2, scope="layer")
    assert (
        len({fo.NM(2, 4, axis=-2), fo.NM(2, 4, axis=-2), fo.Blocks([2, 3]), fo.Blocks((2, 3))}) == 2
    )
    assert fo.Blocks([2, 3]).shape == (2, 3) and fo.NM(np.int64(2), 4).n == 2
    assert fo.NM(1, 3, axis=-2).cap == float(np.float32(2 / 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fo.NM(2, 4, axis=-2).n = 3
    with pytest.raises(ValueError, match=r"scope must be one of: 'global'.*Got 'model'"):
        fo.Unstructured("model")
    # A pattern is a static argument of jit: one trace per pattern value, not per call.
    traces = []

    @functools.partial(jax.jit, static_argnames="pattern")
    def f(scores, s, pattern):
        traces.append(pattern)
        return fo.select(scores, s, pattern=pattern)

    scores = {"w": jnp.arange(16.0).reshape(4, 4)}
    for s in (0.25, 0.5):
        f(scores, jnp.float32(s), pattern=fo.NM(2, 4, axis=-2))
        f(scores, jnp.float32(s), pattern=fo.NM(2, 4, axis=-2))
    assert traces == [fo.NM(2, 4, axis=-2)]


def test_select_refuses_what_is_not_a_pattern():
    scores = {"w": jnp.ones((4, 4))}
    with pytest.raises(TypeError, match=r"pattern must be a selection pattern .*Got the class NM"):
        fo.select(scores, 0.5, pattern=fo.NM)
    with pytest.raises(TypeError, match=r"a method select\(scores, sparsity.*Got 'layer'"):
        fo.select(scores, 0.5, pattern="layer")


@pytest.mark.parametrize("pattern", [fo.NM(2, 4, axis=-2), fo.Blocks((2, 2), axes=(-2, -1))])
def test_mask_entry_points_take_a_pattern(pattern):
    """magnitude_mask and both stages of two_stage_mask select in the pattern's units."""
    rng = np.random.default_rng(11)
    params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.ones(4)}
    fisher = jax.tree.map(lambda w: jnp.abs(w) * 0.0 + jnp.asarray(rng.random(w.shape)), params)
    magnitude = fo.scores(params, "magnitude")
    assert_tree_equal(
        fo.magnitude_mask(params, 0.5, pattern=pattern), fo.select(magnitude, 0.5, pattern=pattern)
    )
    got = fo.two_stage_mask(params, 0.5, fisher=fisher, magnitude_fraction=0.5, pattern=pattern)
    first = fo.select(magnitude, 0.25, pattern=pattern)
    want = fo.select(fo.scores(params, "fisher", fisher=fisher), 0.5, pattern=pattern, mask=first)
    assert_tree_equal(got, want)
    assert not (np.asarray(got["w"]) & ~np.asarray(first["w"])).any()
    if isinstance(pattern, fo.NM):
        assert (np.asarray(got["w"]).reshape(2, 4, 4).sum(axis=1) == 2).all()
    else:
        blocks = np.asarray(got["w"]).reshape(4, 2, 2, 2)
        assert (blocks.all(axis=(1, 3)) | ~blocks.any(axis=(1, 3))).all()
