"""fisher_from_state and fisher_tracker against a hand-computed EMA, under every wrapper."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fisher_optax
from fisher_optax import fisher_from_state, fisher_tracker
from fisher_optax._tree import check_matching

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, "out": jnp.ones((2, 2))}
STEPS = 5


def _grads(step):
    """Deterministic, distinct gradients for each step."""
    rng = np.random.default_rng(step)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS)


def _reference(b2, steps=STEPS, grads=None):
    """A NumPy loop: nu_t = b2 nu + (1 - b2) g^2, then nu / (1 - b2**t)."""
    grads = grads or [_grads(t) for t in range(steps)]
    nu = jax.tree.map(lambda p: np.zeros(p.shape), PARAMS)
    for g in grads:
        nu = jax.tree.map(lambda n, gg: b2 * n + (1 - b2) * np.asarray(gg) ** 2, nu, g)
    return jax.tree.map(lambda n: n / (1 - b2 ** len(grads)), nu)


def _run(opt, steps=STEPS, params=PARAMS):
    state = opt.init(params)
    for t in range(steps):
        _, state = opt.update(_grads(t), state, params)
    return state


def _assert_tree_close(got, want, rtol=1e-5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7), got, want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.adam(1e-3, b2=0.9),
        lambda: optax.adamw(1e-3, b2=0.9, weight_decay=0.1),
        lambda: optax.nadam(1e-3, b2=0.9),
        lambda: optax.radam(1e-3, b2=0.9),
        lambda: optax.lamb(1e-3, b2=0.9),
        lambda: optax.amsgrad(1e-3, b2=0.9),
        lambda: optax.contrib.schedule_free_adamw(1e-3, b2=0.9),
        lambda: optax.chain(optax.clip_by_global_norm(1e9), optax.adam(1e-3, b2=0.9)),
        lambda: optax.named_chain(("clip", optax.clip(1e9)), ("adam", optax.scale_by_adam(b2=0.9))),
        lambda: optax.apply_if_finite(optax.adam(1e-3, b2=0.9), 3),
        lambda: optax.contrib.schedule_free(optax.adam(1e-3, b2=0.9), 1e-3),
    ],
    ids=[
        "adam",
        "adamw",
        "nadam",
        "radam",
        "lamb",
        "amsgrad",
        "schedule_free_adamw",
        "chain",
        "named_chain",
        "apply_if_finite",
        "schedule_free",
    ],
)
def test_matches_numpy_ema(make):
    state = _run(make())
    _assert_tree_close(fisher_from_state(state, b2=0.9), _reference(0.9))


def test_default_b2_is_optax_default():
    state = _run(optax.adam(1e-3))
    # float32 holds 0.999 with a relative error of ~1e-5 in 1 - b2: hence rtol=1e-4.
    _assert_tree_close(fisher_from_state(state), _reference(0.999), rtol=1e-4)


def test_inject_hyperparams_b2_wins_over_argument():
    state = _run(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b2=0.8))
    _assert_tree_close(fisher_from_state(state, b2=0.5), _reference(0.8))


def test_inject_hyperparams_innermost_b2_per_group():
    labels = {"dense": "a", "out": "b"}
    opt = optax.partition(
        {
            "a": optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b2=0.8),
            "b": optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b2=0.6),
        },
        labels,
    )
    got = fisher_from_state(_run(opt))
    _assert_tree_close(got["dense"], _reference(0.8)["dense"])
    _assert_tree_close(got["out"], _reference(0.6)["out"])


def test_multisteps_reads_inner_state_of_accumulated_gradients():
    k = 2
    state = _run(optax.MultiSteps(optax.adam(1e-3, b2=0.9), every_k_schedule=k), steps=2 * k)
    grads = [_grads(t) for t in range(2 * k)]
    means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
    _assert_tree_close(fisher_from_state(state, b2=0.9), _reference(0.9, grads=means))


def test_partition_merges_groups():
    labels = {"dense": {"kernel": "adam", "bias": "ams"}, "out": "adam"}
    opt = optax.partition(
        {"adam": optax.adam(1e-3, b2=0.9), "ams": optax.amsgrad(1e-3, b2=0.9)}, labels
    )
    got = fisher_from_state(_run(opt), b2=0.9)
    assert jax.tree.structure(got) == jax.tree.structure(PARAMS)
    _assert_tree_close(got, _reference(0.9))


def test_uncovered_parameters_error_names_paths_and_fill_opt_in():
    labels = {"dense": {"kernel": "adam", "bias": "sgd"}, "out": "sgd"}
    opt = optax.partition({"adam": optax.adam(1e-3, b2=0.9), "sgd": optax.sgd(1e-3)}, labels)
    state = _run(opt)
    with pytest.raises(ValueError, match=r"no second-moment state covers .*\['bias'\].*\['out'\]"):
        fisher_from_state(state)
    with pytest.raises(ValueError, match="needs params="):
        fisher_from_state(state, missing=0.0)
    got = fisher_from_state(state, b2=0.9, missing=0.0, params=PARAMS)
    _assert_tree_close(got["dense"]["kernel"], _reference(0.9)["dense"]["kernel"])
    np.testing.assert_array_equal(got["out"], np.zeros((2, 2)))
    np.testing.assert_array_equal(got["dense"]["bias"], np.zeros(2))


def test_masked_subtree_is_filled_leaf_by_leaf():
    opt = optax.masked(optax.adam(1e-3, b2=0.9), {"dense": False, "out": True})
    with pytest.raises(ValueError, match=r"covers the parameters at \['dense'\]"):
        fisher_from_state(_run(opt))
    got = fisher_from_state(_run(opt), b2=0.9, params=PARAMS, missing=2.0)
    assert jax.tree.structure(got) == jax.tree.structure(PARAMS)
    _assert_tree_close(got["out"], _reference(0.9)["out"])
    np.testing.assert_array_equal(got["dense"]["kernel"], np.full((3, 2), 2.0))


def test_masked_state():
    opt = optax.masked(optax.adam(1e-3, b2=0.9), {"dense": True, "out": False})
    with pytest.raises(ValueError, match=r"\['out'\]"):
        fisher_from_state(_run(opt))
    got = fisher_from_state(_run(opt), b2=0.9, params=PARAMS, missing=1.0)
    _assert_tree_close(got["dense"], _reference(0.9)["dense"])
    np.testing.assert_array_equal(got["out"], np.ones((2, 2)))


def test_fisher_tracker_uses_its_own_decay_and_passes_updates_through():
    opt = optax.chain(fisher_tracker(decay=0.7), optax.sgd(0.1))
    state = opt.init(PARAMS)
    g = _grads(0)
    updates, state = opt.update(g, state, PARAMS)
    _assert_tree_close(updates, jax.tree.map(lambda x: -0.1 * x, g))
    for t in range(1, STEPS):
        _, state = opt.update(_grads(t), state, PARAMS)
    _assert_tree_close(fisher_from_state(state, b2=0.1), _reference(0.7))


def test_fisher_tracker_with_injected_decay():
    opt = optax.inject_hyperparams(fisher_tracker)(decay=0.6)
    _assert_tree_close(fisher_from_state(_run(opt)), _reference(0.6))


def test_batch_size_and_no_bias_correction():
    state = _run(optax.adam(1e-3, b2=0.9))
    ref = _reference(0.9)
    _assert_tree_close(
        fisher_from_state(state, b2=0.9, batch_size=32), jax.tree.map(lambda x: 32 * x, ref)
    )
    raw = jax.tree.map(lambda x: x * (1 - 0.9**STEPS), ref)
    _assert_tree_close(fisher_from_state(state, b2=0.9, bias_correction=False), raw)


@pytest.mark.parametrize(
    ("opt", "named"),
    [
        (optax.sgd(1e-3), "no optimizer memory"),
        (optax.sgd(1e-3, momentum=0.9), "TraceState"),
        (optax.lion(1e-3), "ScaleByLionState"),
        (optax.adabelief(1e-3), "ScaleByBeliefState"),
        (optax.novograd(1e-3), "ScaleByNovogradState"),
        (optax.adafactor(1e-3), "FactoredState"),
    ],
    ids=["sgd", "momentum", "lion", "adabelief", "novograd", "adafactor"],
)
def test_states_without_fisher_are_named(opt, named):
    state = opt.init(PARAMS)
    with pytest.raises(ValueError, match=f"{named}.*fisher_tracker"):
        fisher_from_state(state)


def test_concrete_count_zero_is_a_value_error_at_trace_time():
    state = optax.adam(1e-3).init(PARAMS)
    with pytest.raises(ValueError, match=r"at \[0\] has count == 0: no gradient has been seen"):
        fisher_from_state(state)
    # Closed over under jit, the count is a constant: the error is raised while tracing.
    with pytest.raises(ValueError, match="count == 0"):
        jax.jit(lambda: fisher_from_state(state)).lower()


@pytest.mark.parametrize("bias_correction", [True, False])
def test_traced_count_zero_reads_as_nan(bias_correction):
    read = jax.jit(lambda s: fisher_from_state(s, bias_correction=bias_correction))
    state = optax.adam(1e-3).init(PARAMS)
    for leaf in jax.tree.leaves(read(state)):
        assert np.all(np.isnan(np.asarray(leaf)))
    _, state = optax.adam(1e-3).update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
    for leaf in jax.tree.leaves(read(state)):  # one gradient seen: finite, same program
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert read._cache_size() == 1


def test_several_states_covering_one_leaf_are_ambiguous():
    opt = optax.chain(fisher_tracker(), optax.adam(1e-3))
    with pytest.raises(ValueError, match="several second-moment states"):
        fisher_from_state(_run(opt))


def test_bad_arguments_are_refused_by_message():
    state = _run(optax.adam(1e-3))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        fisher_from_state(state, batch_size=0)
    with pytest.raises(TypeError, match=r"batch_size must be an int >= 1, got True \(bool\)"):
        fisher_from_state(state, batch_size=True)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        fisher_from_state(state, batch_size=2.5)
    with pytest.raises(ValueError, match=r"b2 must be a finite number in \[0.0, 1.0\)"):
        fisher_from_state(state, b2=1.0)
    with pytest.raises(ValueError, match=r"b2 must be a finite number in \[0.0, 1.0\)"):
        fisher_from_state(state, b2=float("nan"))
    with pytest.raises(TypeError, match="b2 must be a real number"):
        fisher_from_state(state, b2=True)
    with pytest.raises(TypeError, match="bias_correction must be True or False"):
        fisher_from_state(state, bias_correction=1)
    with pytest.raises(ValueError, match=r"missing must be a finite number >= 0\.0"):
        fisher_from_state(state, params=PARAMS, missing=-1.0)
    with pytest.raises(ValueError, match=r"missing= fills parameters .* needs params="):
        fisher_from_state(state, missing=0.0)


def test_fisher_tracker_bad_decay():
    with pytest.raises(ValueError, match=r"decay must be a finite number in \[0.0, 1.0\)"):
        fisher_tracker(decay=1.0)
    with pytest.raises(TypeError, match="decay must be a real number"):
        fisher_tracker(decay=True)


def test_params_structure_mismatch_is_named():
    state = _run(optax.adam(1e-3))
    other = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, "zzz": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"no entry for the parameter at \['zzz'\]"):
        fisher_from_state(state, params=other)


def test_under_jit_keeps_dtype_and_does_not_recompile():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    opt = optax.adam(1e-3, b2=0.9)
    state = _run(opt, params=params)
    traces = []

    @jax.jit
    def read(state):
        traces.append(1)
        return fisher_from_state(state, b2=0.9)

    got = read(state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    _assert_tree_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), got), _reference(0.9), rtol=2e-2
    )
    for t in range(3):
        _, state = opt.update(_grads(t), state, params)
        read(state)
    assert len(traces) == 1


def test_keeps_sharding():
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    params = {"w": jax.device_put(jnp.ones((8 * 4, 3)), sharding)}
    opt = optax.adam(1e-3)
    state = opt.init(params)
    _, state = opt.update({"w": jax.device_put(jnp.ones((32, 3)), sharding)}, state, params)
    got = jax.jit(fisher_from_state)(state)
    assert got["w"].sharding.is_equivalent_to(sharding, 2)


def test_nnx_optimizer_lines_up_with_param_state():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2, b2=0.9), wrt=nnx.Param)
    x = jnp.ones((5, 3))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return grads

    grads = step(model, optimizer)
    params = nnx.state(model, nnx.Param)
    for source in (optimizer, optimizer.opt_state):
        # The optimizer is a pytree whose arrays expose __jax_array__: no Flax code needed.
        by_path = fisher_from_state(source, b2=0.9)
        check_matching(params, by_path, ref_name="params", other_name="fisher")
        got = fisher_from_state(source, b2=0.9, params=params)
        assert jax.tree.structure(got) == jax.tree.structure(params)
        # After one step, the corrected nu is exactly g^2.
        jax.tree.map(lambda f, g: np.testing.assert_allclose(f, g**2, rtol=1e-5), got, grads)


def test_core_modules_never_import_flax():
    package = pathlib.Path(fisher_optax.__file__).parent
    # flax.py is the Flax adapter; depgraph.py traces Flax models and imports Flax lazily.
    for path in sorted(package.glob("*.py")):
        if path.name in ("flax.py", "depgraph.py"):
            continue
        text = path.read_text()
        assert "import flax" not in text and "from flax" not in text, path.name
    fisher_text = (package / "fisher.py").read_text()
    assert "OptVariable" not in fisher_text and "hasattr" not in fisher_text
