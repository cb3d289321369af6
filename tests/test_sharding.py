"""Global selection on params sharded over 8 CPU devices: same masks, no all-gather.

The root conftest gives the test session 8 host CPU devices
(``--xla_force_host_platform_device_count=8``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fisher_optax as fo
from fisher_optax import _select as select_mod

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS set by the root conftest)"
)

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def mesh_2x4(explicit=False):
    """Auto axes (``Mesh``'s default: layouts unknown while tracing), or explicit ones
    (``jax.make_mesh``'s default: the abstract values carry the partition specs)."""
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    if not explicit:
        return Mesh(devices, ("data", "model"))
    return Mesh(devices, ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def counted_per_shard(lowered_text):
    """Whether the selection counted inside shard_map (the three-candidate sharded path)."""
    return "manual_computation" in lowered_text or "SPMDFullToShardShape" in lowered_text


def sharded_tree(rng, ties, explicit=False):
    """Leaves sharded along rows, columns, both, and one replicated."""
    mesh = mesh_2x4(explicit)
    shapes_specs = {
        "a": ((64, 256), P("data", "model")),
        "b": ((128, 40), P(("data", "model"), None)),
        "c": ((24, 512), P(None, "model")),
        "d": ((16, 8), P()),
        "bias": ((256,), P("model")),
    }
    tree, shardings = {}, {}
    for name, (shape, spec) in shapes_specs.items():
        x = rng.integers(0, 50, shape) if ties else rng.standard_normal(shape)
        shardings[name] = NamedSharding(mesh, spec)
        tree[name] = jax.device_put(jnp.asarray(x, jnp.float32), shardings[name])
    return tree, shardings


def hlo_collectives(compiled_text):
    return {c: len(re.findall(rf"\b{c}(-start)?\(", compiled_text)) for c in COLLECTIVES}


@pytest.mark.parametrize(
    ("scope", "ties", "stored_keys", "explicit"),
    [  # each value of each argument at least once
        ("global", False, True, False),
        ("global", True, False, False),
        ("layer", True, True, True),
        ("global", True, False, True),
    ],
)
def test_sharded_topk_matches_single_device_without_gathers(
    ties, scope, stored_keys, explicit, monkeypatch, request
):
    """Stored keys, and (stored_keys=False) keys recomputed in every phase, as above
    fisher_optax._select.STORED_KEYS_MAX; on a mesh of Auto axes (one candidate per pass)
    and of explicit axes (three, counted per shard in shard_map)."""
    if not stored_keys:
        monkeypatch.setattr(select_mod, "STORED_KEYS_MAX", 0)
        jax.clear_caches()  # the selection's inner jit caches its trace
        request.addfinalizer(jax.clear_caches)
    rng = np.random.default_rng(0)
    scores, shardings = sharded_tree(rng, ties, explicit)
    assert len(scores["a"].sharding.device_set) == 8
    prior = jax.tree.map(lambda x: jnp.asarray(rng.uniform(size=x.shape) > 0.1), scores)
    prior = jax.tree.map(jax.device_put, prior, shardings)

    def select(scores, prior, sparsity):
        return fo.select(scores, sparsity, pattern=fo.Unstructured(scope), mask=prior)

    lowered = jax.jit(select).lower(scores, prior, jnp.float32(0.6))
    assert counted_per_shard(lowered.as_text()) == explicit
    compiled = lowered.compile()
    got = compiled(scores, prior, jnp.float32(0.6))
    local = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), scores)
    lprior = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), prior)
    want = fo.select(local, float(jnp.float32(0.6)), pattern=fo.Unstructured(scope), mask=lprior)
    for k in scores:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    # The mask keeps the layout of its leaf.
    assert got["a"].sharding.is_equivalent_to(shardings["a"], 2)
    text = compiled.as_text()
    found = hlo_collectives(text)
    assert found == dict.fromkeys(COLLECTIVES, 0), found
    assert "all-reduce" in text  # the counts do cross devices, as scalars


@pytest.mark.parametrize("explicit", [False, True])
def test_sharded_pruned_step_without_gathers(explicit):
    mesh = mesh_2x4(explicit)
    rng = np.random.default_rng(1)
    spec = {"w1": P("data", "model"), "w2": P("model", None), "b": P()}
    shapes = {"w1": (64, 128), "w2": (128, 16), "b": (16,)}
    params = {
        k: jax.device_put(
            jnp.asarray(rng.standard_normal(s), jnp.float32), NamedSharding(mesh, spec[k])
        )
        for k, s in shapes.items()
    }
    # One Fisher selection per step (two_stage would compile the same kernel twice).
    opt = fo.pruned(
        optax.adam(1e-2),
        fo.constant_sparsity(0.5),
        criterion="fisher",
        method="one_stage",
        update_every=1,
    )
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    lowered = step.lower(params, state)
    assert counted_per_shard(lowered.as_text()) == explicit
    compiled = lowered.compile()
    new_params, new_state = compiled(*compiled(params, state))  # step 1 updates the mask
    assert sum(int((~m).sum()) for m in jax.tree.leaves(new_state.mask)) == round(0.5 * 10240)
    # Same result as on one device.
    local = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), params)
    lp, ls = jax.jit(step)(*jax.jit(step)(local, opt.init(local)))
    for k in params:
        np.testing.assert_array_equal(np.asarray(new_state.mask[k]), np.asarray(ls.mask[k]))
        np.testing.assert_array_equal(np.asarray(new_params[k]), np.asarray(lp[k]))
    found = hlo_collectives(compiled.as_text())
    assert found == dict.fromkeys(COLLECTIVES, 0), found


def test_the_gather_check_can_fail_a_full_sort_gathers():
    """The argsort selection of existing pruners on the same sharded scores does gather."""
    scores, _ = sharded_tree(np.random.default_rng(0), ties=False)

    def argsort_threshold(scores):
        flat = jnp.concatenate([x.ravel() for x in scores.values()])
        return flat[jnp.argsort(flat)[flat.size // 2]]

    text = jax.jit(argsort_threshold).lower(scores).compile().as_text()
    found = hlo_collectives(text)
    assert sum(found.values()) > 0, found


def test_may_be_sharded_reads_the_mesh_of_the_abstract_value():
    """The selection counts three candidates per variadic reduction only on values that
    carry no mesh; a sharded leaf and anything computed from it take the plain passes."""
    scores, _ = sharded_tree(np.random.default_rng(0), ties=False)
    seen = {}

    @jax.jit
    def probe(a, b):
        seen["sharded"] = select_mod.may_be_sharded(a)
        seen["derived"] = select_mod.may_be_sharded(jnp.abs(a) * 2.0)
        seen["local"] = select_mod.may_be_sharded(b)
        return a

    probe(scores["a"], jnp.ones(3))
    assert seen == {"sharded": True, "derived": True, "local": False}
    assert not select_mod.may_be_sharded(jnp.ones(3))


def test_explicit_layout_only_for_explicit_axes():
    """The mesh and spec are read where the abstract value carries them (explicit axes);
    Auto axes and local values give None (their counts take the plain passes)."""
    auto, _ = sharded_tree(np.random.default_rng(0), ties=False)
    explicit, _ = sharded_tree(np.random.default_rng(0), ties=False, explicit=True)
    seen = {}

    @jax.jit
    def probe(a, e, b):
        seen["auto"] = select_mod.explicit_layout(a)
        seen["explicit"] = select_mod.explicit_layout(e)
        seen["derived"] = select_mod.explicit_layout(jnp.abs(e) * 2.0)
        seen["local"] = select_mod.explicit_layout(b)
        return a

    probe(auto["a"], explicit["a"], jnp.ones(3))
    assert seen["auto"] is None and seen["local"] is None
    for key in ("explicit", "derived"):
        mesh, spec = seen[key]
        assert mesh.shape == {"data": 2, "model": 4} and tuple(spec) == ("data", "model")


@pytest.mark.parametrize(("stored_keys", "explicit"), [(True, True), (False, True), (True, False)])
def test_sharded_shapes_whose_blocks_do_not_split_evenly(
    stored_keys, explicit, monkeypatch, request
):
    """The tie-break's per-row counts must not reshape a sharded leaf into blocks of 32 (a
    64-wide axis over 4 devices is 16 per device): on explicit axes jax refuses such a
    reshape, on Auto axes the partitioner moves data (collective-permute). Ties everywhere,
    so the tie-break runs."""
    if not stored_keys:
        monkeypatch.setattr(select_mod, "STORED_KEYS_MAX", 0)
        jax.clear_caches()  # the selection's inner jit caches its trace
        request.addfinalizer(jax.clear_caches)
    mesh = mesh_2x4(explicit)
    rng = np.random.default_rng(3)
    shapes_specs = {
        "a": ((64, 64), P("data", "model")),
        "b": ((8, 12, 20), P(None, "model", None)),
        "c": ((36,), P("model")),
        "d": ((4, 28), P(None, "model")),
        # chunks of at most 255 (the largest divisor: 150 of 300, 134 of 1072) that do not
        # split evenly over 4 devices: refused on explicit axes, gathered on Auto ones
        "e": ((392, 300), P("data", "model")),
        "f": ((1072,), P("model")),
    }
    tree = {
        k: jax.device_put(
            jnp.asarray(rng.integers(0, 9, shape), jnp.float32), NamedSharding(mesh, spec)
        )
        for k, (shape, spec) in shapes_specs.items()
    }
    every = lambda path, leaf: True
    compiled = jax.jit(lambda t: fo.select(t, 0.5, prunable=every)).lower(tree).compile()
    got = compiled(tree)
    want = fo.select({k: np.asarray(v) for k, v in tree.items()}, 0.5, prunable=every)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
        assert got[k].sharding.is_equivalent_to(tree[k].sharding, tree[k].ndim), k
    found = hlo_collectives(compiled.as_text())
    assert found == dict.fromkeys(COLLECTIVES, 0), found


@pytest.mark.parametrize("explicit", [False, True])
def test_pruned_init_lays_the_mask_out_like_the_params(explicit):
    """The mask was built whole on device 0: a jitted step compiled once more than adam's
    (the mask's layout changed twice); eager masks placed unranked leaves there too."""
    mesh = mesh_2x4(explicit)
    rng = np.random.default_rng(1)
    params = {
        "w": jax.device_put(jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
                            NamedSharding(mesh, P("data", "model"))),
        "b": jax.device_put(jnp.zeros(16), NamedSharding(mesh, P())),
    }  # fmt: skip
    opt = fo.pruned(optax.adam(1e-2), 0.5, criterion="magnitude", method="one_stage")
    state = opt.init(params)
    for k in params:
        assert state.mask[k].sharding.is_equivalent_to(params[k].sharding, params[k].ndim), k
    eager = fo.magnitude_mask(params, 0.5)
    assert eager["b"].sharding.is_equivalent_to(params["b"].sharding, 1)
    sizes = {}
    for name, o in (("adam", optax.adam(1e-2)), ("pruned", opt)):
        p, s = params, o.init(params)

        @jax.jit
        def step(p, s, o=o):
            u, s = o.update(jax.tree.map(jnp.cos, p), s, p)
            return optax.apply_updates(p, u), s

        for _ in range(4):
            p, s = step(p, s)
        sizes[name] = step._cache_size()
    assert sizes["pruned"] == sizes["adam"], sizes
