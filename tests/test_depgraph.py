"""Tests of fisher_optax.depgraph: coupled groups from the trace, scores, masks, cuts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fisher_optax
from fisher_optax import depgraph

# --------------------------------------------------------------------------------------------
# Models (tiny widths: the tests run in the suite's time budget)


class Block(nnx.Module):
    def __init__(self, cin, cout, stride, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.proj = (
            nnx.Conv(cin, cout, (1, 1), strides=stride, rngs=rngs)
            if cin != cout or stride != 1
            else None
        )

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet(nnx.Module):
    def __init__(self, w=4, rngs=None):
        self.stem = nnx.Conv(1, w, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(w, rngs=rngs)
        self.b1 = Block(w, w, 1, rngs)
        self.b2 = Block(w, 2 * w, 2, rngs)
        self.head = nnx.Linear(2 * w, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        return self.head(self.b2(self.b1(x)).mean(axis=(1, 2)))


class TBlock(nnx.Module):
    def __init__(self, d, h, hidden, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=h, in_features=d, qkv_features=d, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(3, 8, rngs=rngs)
        self.blocks = nnx.List([TBlock(8, 4, 6, rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class ConvFlat(nnx.Module):
    def __init__(self, rngs, groups=1):
        self.conv = nnx.Conv(2, 4, (3, 3), feature_group_count=groups, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.conv(x))
        return self.fc(y.reshape(y.shape[0], -1))


def _randomize_stats(model):
    """Non-trivial BatchNorm statistics, so that slicing them wrongly would show."""
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, nnx.BatchNorm):
            rng = np.random.default_rng(i)
            n = m.num_features
            m.mean.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
            m.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, size=n), jnp.float32))
            m.scale.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
            m.bias.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
    model.eval()
    return model


def run(model, x):
    return depgraph._apply(model, ((x,), {}))


def make(build, seed=0):
    """``build(rngs)`` under one jit: eager initialisers would compile op by op."""
    return nnx.jit(lambda: build(nnx.Rngs(seed)))()


def _keep_half(graph):
    return tuple(np.arange(g.size) % 2 == 1 for g in graph.groups)


def _members(graph):
    return [sorted(g.members) for g in graph.groups]


# --------------------------------------------------------------------------------------------
# ResNet (NNX)


@pytest.fixture(scope="module")
def resnet():
    model = _randomize_stats(make(lambda r: ResNet(4, r)))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    return model, x, depgraph.dependency_graph(model, x)


def test_resnet_groups_follow_the_residual_stream(resnet):
    _, _, graph = resnet

    def bn(name):
        return [(f"{name}['{v}']", 0) for v in ("bias", "mean", "scale", "var")]

    stage1 = sorted(
        [
            ("['stem']['kernel']", 3),
            ("['stem']['bias']", 0),
            *bn("['bn']"),
            ("['b1']['conv1']['kernel']", 2),
            ("['b1']['conv2']['kernel']", 3),
            ("['b1']['conv2']['bias']", 0),
            *bn("['b1']['bn2']"),
            ("['b2']['conv1']['kernel']", 2),
            ("['b2']['proj']['kernel']", 2),
        ]
    )
    stage2 = sorted(
        [
            ("['b2']['conv2']['kernel']", 3),
            ("['b2']['conv2']['bias']", 0),
            *bn("['b2']['bn2']"),
            ("['b2']['proj']['kernel']", 3),
            ("['b2']['proj']['bias']", 0),
            ("['head']['kernel']", 0),
        ]
    )
    inner = [
        sorted(
            [
                (f"['{b}']['conv1']['kernel']", 3),
                (f"['{b}']['conv1']['bias']", 0),
                *bn(f"['{b}']['bn1']"),
                (f"['{b}']['conv2']['kernel']", 2),
            ]
        )
        for b in ("b1", "b2")
    ]
    assert sorted(_members(graph)) == sorted([stage1, stage2, *inner])
    assert sorted(g.size for g in graph.groups) == [4, 4, 8, 8]
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['stem']['kernel']", 2)] == "model input"
    assert reasons[("['head']['kernel']", 1)] == "model output"
    assert "window" in reasons[("['b1']['conv1']['kernel']", 0)]


def test_resnet_cut_matches_masked_model(resnet):
    model, x, graph = resnet
    params = nnx.state(model, nnx.Param)
    fisher = jax.tree.map(lambda p: jnp.abs(p) + 0.1, params)
    keep = depgraph.group_mask(graph, depgraph.group_scores(graph, params, fisher=fisher), 0.5)
    assert sum(int((~k).sum()) for k in keep) == 12  # round(0.5 * 24), exactly
    small = depgraph.cut(model, graph, keep)
    assert type(small) is ResNet
    for g, k in zip(graph.groups, keep, strict=True):
        if "['stem']['kernel']" in dict(g.members):
            k_stage1 = int(k.sum())
    assert small.stem.out_features == small.bn.num_features == k_stage1
    assert small.stem.kernel.shape == (3, 3, 1, k_stage1) == small.stem.kernel_shape
    assert small.b2.proj.in_features == k_stage1
    assert small.head.in_features == small.b2.conv2.out_features
    np.testing.assert_allclose(
        run(small, x), run(depgraph.masked(model, graph, keep), x), rtol=1e-5, atol=1e-5
    )
    assert model.stem.kernel.shape == (3, 3, 1, 4)


def test_group_scores_match_a_numpy_loop(resnet):
    model, _, graph = resnet
    params = nnx.state(model, nnx.Param)
    fisher = jax.tree.map(lambda p: jnp.abs(p) + 0.5, params)
    got = depgraph.group_scores(graph, params, fisher=fisher)
    flat = {
        depgraph._pstr(depgraph._path_tuple(p)): (np.asarray(w), np.asarray(f))
        for (p, w), f in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(fisher), strict=True
        )
    }
    for g, s in zip(graph.groups, got, strict=True):
        for u, unit in enumerate(g.units):
            total = 0.0
            for (i, a), ix in unit.items():
                path = depgraph._pstr(graph.paths[i])
                if path not in flat:  # BatchNorm statistics score nothing
                    continue
                w, f = flat[path]
                for j in ix:
                    total += float(np.sum(0.5 * np.take(f, j, a) * np.take(w, j, a) ** 2))
            np.testing.assert_allclose(s[u], total, rtol=1e-6)


def test_group_mask_counts_scopes_and_min_units(resnet):
    _, _, graph = resnet
    rng = np.random.default_rng(0)
    scores = [rng.random(g.size) for g in graph.groups]
    keep = depgraph.group_mask(graph, scores, 0.25, scope="group")
    for g, s, k in zip(graph.groups, scores, keep, strict=True):
        n = round(0.25 * g.size)
        assert int((~k).sum()) == n
        assert set(np.flatnonzero(~k)) == set(np.argsort(s)[:n])
    keep = depgraph.group_mask(graph, scores, 1.0, min_units=2)
    assert all(int(k.sum()) == 2 for k in keep)
    low = [np.zeros(g.size) if g.size == 4 else np.ones(g.size) for g in graph.groups]
    keep = depgraph.group_mask(graph, low, 0.25, min_units=1)  # 6 of 24: all from the 4-groups
    assert [int((~k).sum()) for k in keep if len(k) == 4] == [3, 3]


def test_group_mask_errors(resnet):
    _, _, graph = resnet
    scores = [np.ones(g.size) for g in graph.groups]
    with pytest.raises(ValueError, match="sparsity must be a finite number in"):
        depgraph.group_mask(graph, scores, 1.5)
    with pytest.raises(ValueError, match="scope must be one of"):
        depgraph.group_mask(graph, scores, 0.5, scope="layer")
    with pytest.raises(ValueError, match="min_units must be an int >= 1"):
        depgraph.group_mask(graph, scores, 0.5, min_units=0)
    with pytest.raises(ValueError, match="scores has 1 arrays but the graph has 4 groups"):
        depgraph.group_mask(graph, scores[:1], 0.5)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        depgraph.group_mask(graph, [np.ones(3), *scores[1:]], 0.5)
    with pytest.raises(ValueError, match="holds non-finite values"):
        depgraph.group_mask(graph, [np.full(g.size, np.nan) for g in graph.groups], 0.5)
    model = resnet[0]
    with pytest.raises(ValueError, match=r"keep for group .* must be a bool array"):
        depgraph.cut(model, graph, [np.ones(g.size, int) for g in graph.groups])
    with pytest.raises(ValueError, match="keep has 1 arrays but the graph has 4 groups"):
        depgraph.masked(model, graph, [np.ones(4, bool)])


# --------------------------------------------------------------------------------------------
# ResNet (Linen): new params plus the new features of every module


class LBlock(nn.Module):
    features: int
    project: bool
    mid: int | None = None

    @nn.compact
    def __call__(self, x):
        y = nn.relu(
            nn.BatchNorm(use_running_average=True)(nn.Conv(self.mid or self.features, (3, 3))(x))
        )
        y = nn.BatchNorm(use_running_average=True)(nn.Conv(self.features, (3, 3))(y))
        s = nn.Conv(self.features, (1, 1))(x) if self.project else x
        return nn.relu(y + s)


class LResNet(nn.Module):
    widths: tuple = (4, 4, 4, 8, 8)  # stem, b1 mid, b1 out, b2 mid, b2 out

    @nn.compact
    def __call__(self, x):
        w = self.widths
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(w[0], (3, 3))(x)))
        x = LBlock(w[2], False, w[1])(x)
        x = LBlock(w[4], True, w[3])(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_linen_resnet_cut_matches_masked_model():
    model = LResNet()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    stats = jax.tree.map(
        lambda v: jax.random.uniform(jax.random.key(3), v.shape, minval=0.5, maxval=2.0),
        variables["batch_stats"],
    )
    variables = {"params": variables["params"], "batch_stats": stats}
    graph = depgraph.dependency_graph(model, x, variables=variables)
    assert sorted(g.size for g in graph.groups) == [4, 4, 8, 8]
    keep = _keep_half(graph)
    result = depgraph.cut(variables, graph, keep)
    p = result.variables["params"]
    widths = (
        p["Conv_0"]["kernel"].shape[-1],
        p["LBlock_0"]["Conv_0"]["kernel"].shape[-1],
        p["LBlock_0"]["Conv_1"]["kernel"].shape[-1],
        p["LBlock_1"]["Conv_0"]["kernel"].shape[-1],
        p["LBlock_1"]["Conv_1"]["kernel"].shape[-1],
    )
    assert widths == (2, 2, 2, 4, 4)
    # the smaller model runs from the module as written (the check ran inside cut), and
    # agrees with the module rebuilt with the new widths
    np.testing.assert_allclose(
        result.apply(x), LResNet(widths).apply(result.variables, x), rtol=1e-5, atol=1e-5
    )
    # Adam's moments of the params are sliced with them, and the small model steps
    tx = optax.adam(1e-2)
    state = tx.init(variables["params"])
    sliced = depgraph.cut_optimizer(state, graph, keep)
    assert jax.tree.map(jnp.shape, sliced[0].mu) == jax.tree.map(
        jnp.shape, result.variables["params"]
    )
    tx.update(result.variables["params"], sliced, result.variables["params"])
    assert state[0].mu["Conv_0"]["kernel"].shape[-1] == 4  # the caller's state is untouched


class LAttn(nn.Module):
    out: int = 6

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="inp")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=8, out_features=self.out, use_bias=False, name="attn"
        )(h)
        return nn.Dense(2, name="head")(nn.relu(h))


def test_linen_attention_keeps_head_dim_whole():
    """Without biases (whose rank-2 shape would freeze everything) query/key/value's head_dim
    must still stay whole: cutting it would need a module with another 1/sqrt(head_dim)
    scale. Only the out projection's features are cut."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    variables = LAttn().init(jax.random.key(1), x)
    graph = depgraph.dependency_graph(LAttn(), x, variables=variables)
    # the attention's input features (LinenCut.apply keeps its qkv_features) and the out
    # projection's features are cut; head_dim and the heads are not
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['params']['attn']['query']['kernel']", 1)].startswith(
        "axis 1 of 'kernel' (6, 2, 4): an axis the Linen module at ['params']['attn']['query'] "
        "cannot resize: attention's heads and head_dim"
    )
    assert _members(graph) == [
        [
            ("['params']['attn']['key']['kernel']", 0),
            ("['params']['attn']['query']['kernel']", 0),
            ("['params']['attn']['value']['kernel']", 0),
            ("['params']['inp']['bias']", 0),
            ("['params']['inp']['kernel']", 1),
        ],
        [("['params']['attn']['out']['kernel']", 2), ("['params']['head']['kernel']", 0)],
    ]
    keep = _keep_half(graph)
    result = depgraph.cut(variables, graph, keep)  # checked
    assert result.variables["params"]["attn"]["query"]["kernel"].shape == (3, 2, 4)
    assert result.apply(x).shape == (2, 5, 2)


# --------------------------------------------------------------------------------------------
# Transformer (NNX): heads and MLP units; the residual stream is coupled but kept whole


def test_transformer_heads_and_mlp_units():
    model = make(Transformer)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    graph = depgraph.dependency_graph(model, x)
    names = sorted(g.name for g in graph.groups)
    assert names == sorted(
        [f"['blocks'][{b}]['attn']['key']['bias'][0]" for b in (0, 1)]
        + [f"['blocks'][{b}]['fc1']['kernel'][1]" for b in (0, 1)]
    )
    heads = next(g for g in graph.groups if "attn" in g.name)
    assert heads.size == 4
    assert {p for p, _ in heads.members} == {
        f"['blocks'][0]['attn']['{m}']['{v}']"
        for m in ("query", "key", "value", "out")
        for v in ("kernel", "bias")
    } - {"['blocks'][0]['attn']['out']['bias']"}
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    # the residual stream: one coupled axis through every block, frozen by LayerNorm's mean
    for path in ("['embed']['kernel']", "['blocks'][1]['fc2']['kernel']"):
        assert reasons[(path, 1)].startswith("reduced by reduce_sum")
    assert reasons[("['blocks'][0]['attn']['query']['kernel']", 2)] == (
        "axis 2 of 'kernel' (8, 4, 2): an axis the LinearGeneral at ['blocks'][0]['attn']"
        "['query'] cannot resize: attention's head_dim (attention scales by 1/sqrt(head_dim))"
    )
    keep = _keep_half(graph)
    small = depgraph.cut(model, graph, keep)
    assert small.blocks[0].attn.num_heads == 2
    assert small.blocks[0].attn.qkv_features == 2 * model.blocks[0].attn.head_dim
    assert small.blocks[1].fc1.out_features == small.blocks[1].fc2.in_features == 3
    np.testing.assert_allclose(
        run(small, x), run(depgraph.masked(model, graph, keep), x), rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Sequential chains and conv -> flatten -> dense, against hand-made references


def test_sequential_cut_against_numpy():
    model = nnx.Sequential(
        nnx.Linear(3, 6, rngs=nnx.Rngs(0)),
        nnx.tanh,
        nnx.Linear(6, 5, rngs=nnx.Rngs(1)),
        nnx.relu,
        nnx.Linear(5, 2, rngs=nnx.Rngs(2)),
    )
    x = jax.random.normal(jax.random.key(0), (4, 3))
    graph = depgraph.dependency_graph(model, x)
    assert [g.size for g in graph.groups] == [6, 5]
    keep = (np.array([1, 0, 1, 1, 0, 1], bool), np.array([0, 1, 1, 0, 1], bool))
    small = depgraph.cut(model, graph, keep)
    w = [np.asarray(m.kernel[...]) for m in model.layers if isinstance(m, nnx.Linear)]
    b = [np.asarray(m.bias[...]) for m in model.layers if isinstance(m, nnx.Linear)]
    h = np.tanh(np.asarray(x) @ w[0][:, keep[0]] + b[0][keep[0]])
    h = np.maximum(h @ w[1][keep[0]][:, keep[1]] + b[1][keep[1]], 0)
    np.testing.assert_allclose(run(small, x), h @ w[2][keep[1]] + b[2], rtol=1e-5, atol=1e-6)
    assert small.layers[2].in_features == 4 and small.layers[2].out_features == 3


def test_conv_flatten_dense_maps_a_channel_to_a_block():
    model = ConvFlat(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    graph = depgraph.dependency_graph(model, x)
    (g,) = graph.groups
    fc = graph.paths.index(("fc", "kernel"))
    # channel c owns the flattened features f with f % 4 == c (NHWC, row-major)
    for c in range(4):
        np.testing.assert_array_equal(g.units[c][fc, 0], np.arange(c, 64, 4))
    keep = (np.array([True, False, True, False]),)
    small = depgraph.cut(model, graph, keep)
    assert small.fc.kernel.shape == (32, 3) and small.conv.out_features == 2
    rows = np.flatnonzero(np.arange(64) % 4 % 2 == 0)
    np.testing.assert_array_equal(small.fc.kernel[...], model.fc.kernel[...][rows])


# --------------------------------------------------------------------------------------------
# Optimizer state


def test_cut_optimizer_slices_adam_moments():
    model = nnx.Sequential(
        nnx.Linear(3, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 2, rngs=nnx.Rngs(1))
    )
    x = jax.random.normal(jax.random.key(0), (4, 3))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    opt.update(model, grads)
    graph = depgraph.dependency_graph(model, x)
    keep = (np.array([1, 1, 0, 1, 0, 1], bool),)
    small = depgraph.cut(model, graph, keep)
    new_opt = depgraph.cut_optimizer(opt, graph, keep, model=small)
    mu = opt.opt_state[0].mu["layers"][0]["kernel"][...]
    np.testing.assert_array_equal(
        new_opt.opt_state[0].mu["layers"][0]["kernel"][...], np.asarray(mu)[:, keep[0]]
    )
    assert int(new_opt.opt_state[0].count[...]) == 1
    new_opt.update(small, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(small))  # it steps
    with pytest.raises(
        ValueError, match=r"sliced optimizer state at .*bias.\] has shape \(4,\) but the"
    ):
        depgraph.cut_optimizer(opt, graph, keep, model=model)  # not the cut model


# --------------------------------------------------------------------------------------------
# What the graph refuses (kept whole, with the reason) and the check after the cut


def test_grouped_conv_is_kept_whole():
    graph = depgraph.dependency_graph(ConvFlat(nnx.Rngs(0), groups=2), jnp.ones((1, 4, 4, 2)))
    assert graph.groups == ()
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['conv']['kernel']", 3)].startswith("grouped convolution")
    assert "grouped and depthwise convs are kept whole" in graph.report()


class CatInput(nnx.Module):
    """DenseNet / U-Net style: the model input concatenated to features before ``c``."""

    def __init__(self, rngs):
        self.a = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.b = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.c = nnx.Conv(4 + 2, 3, (3, 3), rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.a(x))
        return self.c(jnp.concatenate([x, nnx.relu(self.b(h))], axis=-1)).mean((1, 2))


def test_concatenation_with_a_part_kept_whole_keeps_the_other_part_whole_too():
    """``c`` reads [input, b's channels]: its input axis is kept whole (the model input), so
    b's output channels, tied to it, are not prunable (they were, and cut failed inside its
    own check); a's channels, which c never sees, still are."""
    model = make(CatInput)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
    graph = depgraph.dependency_graph(model, x)
    assert _members(graph) == [
        [("['a']['bias']", 0), ("['a']['kernel']", 3), ("['b']['kernel']", 2)]
    ]
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['b']['kernel']", 3)] == (
        "tied to ['c']['kernel'][2], which is kept whole: model input"
    )
    keep = _keep_half(graph)
    small = depgraph.cut(model, graph, keep)
    assert small.a.kernel.shape == (3, 3, 2, 2) and small.b.kernel.shape == (3, 3, 2, 4)
    np.testing.assert_allclose(small(x), depgraph.masked(model, graph, keep)(x), atol=1e-5)


class WithStack(nnx.Module):
    """Two Linear layers stacked by nnx.vmap (kernel (2, 3, 3)) next to a prunable pair."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(3, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 2, rngs=rngs)

        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(r):
            return nnx.Linear(3, 3, rngs=r)

        self.stack = stacked(rngs)
        self.o = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, h):
            return nnx.relu(layer(h))

        return self.fc2(nnx.relu(self.fc1(x))) + self.o(body(self.stack, x))


def test_cut_with_layers_stacked_by_nnx_vmap():
    """Resizing read a stacked kernel (L, in, out) as (in, out): any cut failed with a
    ValueError from unpacking. Shapes are read from the trailing axes."""
    model = WithStack(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 3))
    graph = depgraph.dependency_graph(model, x)
    assert [g.name for g in graph.groups] == ["['fc1']['kernel'][1]"]
    keep = _keep_half(graph)
    small = depgraph.cut(model, graph, keep)
    assert small.fc1.out_features == 3 and small.fc2.in_features == 3
    assert (small.stack.in_features, small.stack.out_features) == (3, 3)
    np.testing.assert_allclose(small(x), depgraph.masked(model, graph, keep)(x), atol=1e-5)


class Cumsum(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.cumsum(nnx.relu(self.a(x)), axis=-1))


def test_unknown_primitive_is_kept_whole():
    graph = depgraph.dependency_graph(Cumsum(nnx.Rngs(0)), jnp.ones((1, 3)))
    assert graph.groups == ()
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['a']['kernel']", 1)] == "primitive cumsum is not understood"


class Scaled(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        return self.a(x) * jnp.asarray([1.0, 2.0, 3.0, 4.0])


class LinenNormed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="b")(nn.LayerNorm(name="ln")(nn.Dense(4, name="a")(x)))


def test_reasons_name_the_constant_and_the_module_that_froze_an_axis():
    graph = depgraph.dependency_graph(Scaled(nnx.Rngs(0)), jnp.ones((1, 3)))
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['a']['kernel']", 1)].startswith(
        "a constant array of shape (4,) and dtype float32 closed over by the model (read by "
        "broadcast_in_dim in Scaled.__call__ at tests/test_depgraph.py:"
    )
    x = jnp.ones((1, 3))
    variables = LinenNormed().init(jax.random.key(0), x)
    graph = depgraph.dependency_graph(LinenNormed(), x, variables=variables)
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    # the norm's own scale and the Dense layers around it give the norm as the cause
    for path in ("['params']['ln']['scale']", "['params']['a']['kernel']"):
        why = reasons[(path, 0 if "ln" in path else 1)]
        assert why.startswith("reduced by reduce_sum in LinenNormed/ln (_compute_stats at "), why


def test_linen_inexact_cut_through_a_layernorm_runs_with_the_new_width():
    x = jax.random.normal(jax.random.key(0), (2, 3))
    variables = LinenNormed().init(jax.random.key(1), x)
    graph = depgraph.dependency_graph(LinenNormed(), x, variables=variables, exact=False)
    assert not graph.exact and [g.size for g in graph.groups] == [4]
    result = depgraph.cut(variables, graph, (np.arange(4) != 1,))  # checked for shapes
    assert result.variables["params"]["ln"]["scale"].shape == (3,)
    out = result.apply(x)
    assert out.shape == (2, 2) and np.all(np.isfinite(out))


def _by_range(h):
    return h / (h.max(-1, keepdims=True) - h.min(-1, keepdims=True))


def test_inexact_cut_whose_output_is_not_finite_is_refused():
    i = _init(0)
    model = nnx.Sequential(nnx.Linear(3, 4, **i), _by_range, nnx.Linear(4, 2, **i))
    graph = depgraph.dependency_graph(model, jnp.ones((1, 3)), exact=False)
    assert not graph.exact
    # one unit left: its range is zero
    with pytest.raises(ValueError, match=r"inexact cut model's output <root> is not finite"):
        depgraph.cut(model, graph, (np.arange(4) == 0,))


class Twice(nnx.Module):
    """A layer applied twice: to the input, then to a hidden activation."""

    def __init__(self, rngs, first_on_input):
        self.inp = nnx.Linear(4, 4, rngs=rngs)
        self.shared = nnx.Linear(4, 4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)
        self.first_on_input = first_on_input

    def __call__(self, x):
        first = self.shared if self.first_on_input else self.inp
        h = nnx.relu(first(x))
        h = nnx.relu((self.inp if self.first_on_input else self.shared)(h))
        return self.out(self.shared(h))


def test_layer_applied_twice_couples_both_uses():
    # its input and output axes are tied through the chain: one group, cut consistently
    model = Twice(nnx.Rngs(0), first_on_input=False)
    x = jax.random.normal(jax.random.key(0), (2, 4))
    graph = depgraph.dependency_graph(model, x)
    members = {m for g in graph.groups for m in g.members}
    assert ("['shared']['kernel']", 0) in members and ("['shared']['kernel']", 1) in members
    keep = _keep_half(graph)
    small = depgraph.cut(model, graph, keep)
    np.testing.assert_allclose(
        run(small, x), run(depgraph.masked(model, graph, keep), x), atol=1e-6
    )
    # applied to the model input once, its input axis is tied to the input: kept whole
    # (its output axis still forms one group over both uses and the two consumers)
    graph = depgraph.dependency_graph(Twice(nnx.Rngs(0), first_on_input=True), x)
    assert _members(graph) == [
        sorted(
            [
                ("['shared']['kernel']", 1),
                ("['shared']['bias']", 0),
                ("['inp']['kernel']", 0),
                ("['out']['kernel']", 0),
            ]
        )
    ]
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    why = reasons[("['shared']['kernel']", 0)]
    assert why.startswith("model input (the parameter is read by 2 operations, e.g. a layer")


class ShapeConstant(nnx.Module):
    """Uses a width as a number: the trace sees a constant, so only the check can catch it."""

    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.a(x))
        return self.b(h) * h.shape[-1]


def test_cut_is_refused_when_the_result_differs():
    model = ShapeConstant(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 3))
    graph = depgraph.dependency_graph(model, x)
    with pytest.raises(ValueError, match=r"output <root> differs from the masked model's"):
        depgraph.cut(model, graph, _keep_half(graph))
    small = depgraph.cut(model, graph, _keep_half(graph), verify=False)
    assert small.a.out_features == 2


class Branchy(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        return self.a(x) if float(x.sum()) > 0 else -self.a(x)


def test_untraceable_forward_and_wrong_model_are_refused():
    with pytest.raises(ValueError, match=r"cannot be traced with jax\.make_jaxpr.*lax\.cond"):
        depgraph.dependency_graph(Branchy(nnx.Rngs(0)), jnp.ones((1, 3)))
    model = nnx.Sequential(
        nnx.Linear(3, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 2, rngs=nnx.Rngs(1))
    )
    x = jnp.ones((2, 3))
    graph = depgraph.dependency_graph(model, x)
    keep = (np.arange(6) < 3,)
    small = depgraph.cut(model, graph, keep)
    with pytest.raises(
        ValueError, match=r"model at .* has shape \(3,\) but the graph was traced with shape \(6,\)"
    ):
        depgraph.cut(small, graph, keep)
    other = nnx.Sequential(nnx.Linear(3, 6, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="does not have the variables the graph was traced"):
        depgraph.masked(other, graph, keep)


def test_bad_model_and_params():
    with pytest.raises(TypeError, match=r"model must be an nnx\.Module, or a Linen module"):
        depgraph.dependency_graph(lambda x: x, jnp.ones(3))
    model = ConvFlat(nnx.Rngs(0))
    graph = depgraph.dependency_graph(model, jnp.ones((1, 4, 4, 2)))
    with pytest.raises(TypeError, match=r"variables= is for a Linen module; an nnx\.Module"):
        depgraph.dependency_graph(model, jnp.ones((1, 4, 4, 2)), variables=nnx.state(model))
    with pytest.raises(ValueError, match=r"params has a leaf at .* that the traced model lacks"):
        depgraph.group_scores(graph, {"other": jnp.ones(3)}, "magnitude")
    with pytest.raises(TypeError, match="traced from a Linen module: pass the variables"):
        depgraph.cut(model, graph._replace(kind="linen"), (np.ones(4, bool),))
    with pytest.raises(TypeError, match="traced from an NNX model: pass that model"):
        depgraph.cut(nnx.state(model), graph, (np.ones(4, bool),))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(TypeError, match="needs model=, the cut model it will update"):
        depgraph.cut_optimizer(opt, graph, (np.ones(4, bool),))


def test_cut_optimizer_slices_pruned_masks_and_moments():
    model = nnx.Sequential(
        nnx.Linear(3, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 2, rngs=nnx.Rngs(1))
    )
    x = jax.random.normal(jax.random.key(0), (4, 3))
    tx = fisher_optax.pruned(optax.adam(1e-2), 0.5, criterion="magnitude", method="one_stage")
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    opt.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))
    graph = depgraph.dependency_graph(model, x)
    keep = (np.array([1, 0, 1, 1, 0, 1], bool),)
    small = depgraph.cut(model, graph, keep)
    new_opt = depgraph.cut_optimizer(opt, graph, keep, model=small)
    old_mask = np.asarray(opt.opt_state.mask["layers"][2]["kernel"][...])
    new_mask = np.asarray(new_opt.opt_state.mask["layers"][2]["kernel"][...])
    np.testing.assert_array_equal(new_mask, old_mask[keep[0], :])
    nu = np.asarray(opt.opt_state.inner_state[0].nu["layers"][0]["kernel"][...])
    np.testing.assert_array_equal(
        new_opt.opt_state.inner_state[0].nu["layers"][0]["kernel"][...], nu[:, keep[0]]
    )
    new_opt.update(small, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(small))  # it steps
    assert new_opt.opt_state.mask["layers"][0]["kernel"][...].shape == (3, 4)


class DropoutResidual(nnx.Module):
    """Conv-BN-relu, a residual branch with Dropout, global pooling: a model users write."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.conv = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.stem(x)))
        h = h + self.drop(nnx.relu(self.conv(h)))
        return self.head(h.mean((1, 2)))


def test_a_model_in_training_mode_is_traced_and_checked_in_evaluation_mode():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 1))
    model = DropoutResidual(nnx.Rngs(0))  # training mode: Dropout draws random bits
    graph = depgraph.dependency_graph(model, x)
    assert [g.size for g in graph.groups] == [8]  # the residual stream: stem, bn, conv
    keep = (np.arange(8) % 2 == 0,)
    small = depgraph.cut(model, graph, keep)
    assert small.stem.out_features == 4 and small.bn.mean.shape == (4,)
    assert not model.drop.deterministic  # the caller's model keeps its mode
    small.eval()
    masked = depgraph.masked(model, graph, keep)
    masked.eval()
    np.testing.assert_allclose(small(x), masked(x), atol=1e-5)


class SharedHidden(nnx.Module):
    """A square layer applied twice in a chain: its input and output channels are one unit."""

    def __init__(self, rngs):
        self.a = nnx.Linear(3, 5, rngs=rngs)
        self.s = nnx.Linear(5, 5, rngs=rngs)
        self.o = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.a(x))
        return self.o(nnx.relu(self.s(nnx.relu(self.s(h)))))


def test_group_scores_count_each_removed_entry_once():
    """Unit j removes row j and column j of s.kernel: the diagonal entry (j, j) lies in both
    slices and was counted twice. Reference: the set of entries the cut removes."""
    model = make(SharedHidden)
    x = jax.random.normal(jax.random.key(0), (2, 3))
    graph = depgraph.dependency_graph(model, x)
    params = nnx.state(model, nnx.Param)
    (got,) = depgraph.group_scores(graph, params, "magnitude")
    flat = {
        depgraph._path_tuple(p): np.abs(np.asarray(w))
        for p, w in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    (size,) = [g.size for g in graph.groups]
    want = []
    for u in range(size):
        keep = np.ones(size, bool)
        keep[u] = False
        removed = 0.0
        for path, ix in depgraph._cut_index(graph, (keep,)).items():
            w = flat[path]
            gone = np.ones(w.shape, bool)
            kept = [np.arange(n) if k is None else k for n, k in zip(w.shape, ix, strict=True)]
            gone[np.ix_(*kept)] = False
            removed += w[gone].sum()
        want.append(removed)
    np.testing.assert_allclose(got, want, rtol=1e-6)


class HandAttn(nnx.Module):
    """One head written by hand, scaled by 1/sqrt(q.shape[-1]): a width read as a number."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(3, 8, rngs=rngs)
        self.q = nnx.Linear(8, 8, rngs=rngs)
        self.k = nnx.Linear(8, 8, rngs=rngs)
        self.v = nnx.Linear(8, 8, rngs=rngs)
        self.o = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.inp(x))
        q, k, v = self.q(h), self.k(h), self.v(h)
        a = jax.nn.softmax(jnp.einsum("bld,bmd->blm", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
        return self.o(jnp.einsum("blm,bmd->bld", a, v))


def test_refused_cut_names_the_groups_cut_and_how_to_keep_one_whole():
    model = make(HandAttn)
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    graph = depgraph.dependency_graph(model, x)
    qk = next(i for i, g in enumerate(graph.groups) if g.name == "['k']['kernel'][1]")
    keep = list(_keep_half(graph))
    with pytest.raises(ValueError, match=rf"Groups cut: .*{qk} \(\['k'\]\['kernel'\]\[1\]\).*"
                       r"keep\[g\] = np.ones\(graph.groups\[g\].size, bool\)"):  # fmt: skip
        depgraph.cut(model, graph, tuple(keep))
    keep[qk] = np.ones(graph.groups[qk].size, bool)  # the width the scale reads stays whole
    small = depgraph.cut(model, graph, tuple(keep))
    np.testing.assert_allclose(small(x), depgraph.masked(model, graph, keep)(x), atol=1e-5)


# --------------------------------------------------------------------------------------------
# The selection rule: select's count and ties


def _wide(n=50):
    """One hidden group of ``n`` units."""
    return nnx.Sequential(
        nnx.Linear(2, n, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(n, 1, rngs=nnx.Rngs(1))
    )


def test_group_mask_counts_as_select_the_float32_product_half_to_even():
    graph = depgraph.dependency_graph(_wide(50), jnp.ones((1, 2)))
    scores = [np.arange(50.0)]
    # float32(0.05) * 50 = 2.50000004 exactly: 3 units go (float64 0.05 * 50 = 2.5 gives 2)
    (keep,) = depgraph.group_mask(graph, scores, 0.05)
    np.testing.assert_array_equal(np.flatnonzero(~keep), [0, 1, 2])
    for s in (0.05, 0.1, 0.3, 0.7, 0.99):
        (keep,) = depgraph.group_mask(graph, scores, s, scope="group")
        want = ~np.asarray(fisher_optax.select((jnp.arange(50.0),), s, prunable=(True,))[0])
        # the count of select, short of the min_units=1 the group keeps (0.99: 50 -> 49)
        assert int((~keep).sum()) == min(int(want.sum()), 49), s


def test_group_mask_ties_prune_the_lower_index_first_across_groups(resnet):
    _, _, graph = resnet
    scores = [np.ones(g.size) for g in graph.groups]
    keep = depgraph.group_mask(graph, scores, 0.25)  # 6 of 24 tied units
    # the first 6 in group order, then unit order, but each group keeps its min_units=1
    # best, which among ties is its highest index
    eligible = np.concatenate([np.arange(g.size) < g.size - 1 for g in graph.groups])
    np.testing.assert_array_equal(np.concatenate(keep), ~(eligible & (np.cumsum(eligible) <= 6)))
    keep = depgraph.group_mask(graph, scores, 0.5, scope="group")
    for g, k in zip(graph.groups, keep, strict=True):
        np.testing.assert_array_equal(np.flatnonzero(~k), np.arange(g.size // 2))


# --------------------------------------------------------------------------------------------
# A param-shaped mask from a selection, and the selection under jit


def test_weight_mask_applied_gives_the_masked_models_params(resnet):
    model, _, graph = resnet
    params = nnx.state(model, nnx.Param)
    keep = tuple(np.arange(g.size) % 3 != 1 for g in graph.groups)
    mask = depgraph.weight_mask(graph, keep, params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    want = nnx.state(depgraph.masked(model, graph, keep), nnx.Param)
    for a, b in zip(
        jax.tree.leaves(fisher_optax.apply_mask(params, mask)), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # it counts what the cut keeps
    small = depgraph.cut(model, graph, keep)
    kept = sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
    assert kept == sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param)))
    # keep_pruned holds the removed units at zero while training
    tx = optax.chain(optax.sgd(0.1), fisher_optax.keep_pruned(mask))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    stepped = optax.apply_updates(params, updates)
    for s, m in zip(jax.tree.leaves(stepped), jax.tree.leaves(mask), strict=True):
        assert not np.any(np.asarray(s)[~np.asarray(m)])
    with pytest.raises(ValueError, match=r"params has a leaf at .* that the traced model lacks"):
        depgraph.weight_mask(graph, keep, {"zz": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"keep is traced .* select the units with select_groups"):
        jax.jit(lambda k: depgraph.weight_mask(graph, k, params))(keep)
    with pytest.raises(ValueError, match="keep is traced"):
        jax.jit(lambda k: depgraph.masked(model, graph, k))(keep)


def test_select_groups_eager_jitted_and_three_step_agree_with_one_compile(resnet):
    model, _, graph = resnet
    params = nnx.state(model, nnx.Param)
    scores = fisher_optax.scores(params, "magnitude")
    select = jax.jit(lambda s, p: depgraph.select_groups(graph, s, p, scope="group", min_units=2))
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        keep = depgraph.group_mask(
            graph, depgraph.group_scores(graph, params, "magnitude"), sparsity, scope="group",
            min_units=2,
        )  # fmt: skip
        want = jax.tree.leaves(depgraph.weight_mask(graph, keep, params))
        eager = jax.tree.leaves(
            depgraph.select_groups(graph, scores, sparsity, scope="group", min_units=2)
        )
        jitted = jax.tree.leaves(select(scores, jnp.float32(sparsity)))
        for w, e, j in zip(want, eager, jitted, strict=True):
            np.testing.assert_array_equal(w, e)
            np.testing.assert_array_equal(w, j)
    assert select._cache_size() == 1


def test_select_groups_with_an_earlier_mask_only_grows_it():
    model = _wide(10)
    graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
    params = nnx.state(model, nnx.Param)
    scores = jax.tree.map(lambda p: jnp.ones_like(p), params)
    first = depgraph.select_groups(graph, scores, 0.2)  # units 0 and 1 (ties: low index first)
    assert np.flatnonzero(~np.asarray(first["layers"][0]["bias"][...])).tolist() == [0, 1]
    # units 0 and 1, fully pruned in the mask, count toward 0.3: one more goes (unit 2)
    scores = jax.tree.map(lambda p: -jnp.ones_like(p), params)  # would pick 0..2 anyway
    scores["layers"][0]["kernel"] = nnx.Param(jnp.ones((2, 10)).at[:, 9].set(-5.0))
    second = jax.jit(lambda s, m: depgraph.select_groups(graph, s, 0.3, mask=m))(scores, first)
    gone = np.flatnonzero(~np.asarray(second["layers"][0]["bias"][...]))
    assert gone.tolist() == [0, 1, 9]
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        assert not np.any(np.asarray(b) & ~np.asarray(a))  # nothing pruned grows back
    with pytest.raises(TypeError, match=r"mask at .* has dtype float32; a mask holds booleans"):
        depgraph.select_groups(graph, scores, 0.3, mask=jax.tree.map(jnp.ones_like, params))
    with pytest.raises(ValueError, match="scope must be one of"):
        depgraph.select_groups(graph, scores, 0.3, scope="layer")
    with pytest.raises(ValueError, match="sparsity must be a finite number in"):
        depgraph.select_groups(graph, scores, 1.3)


def test_groups_pattern_in_select_and_pruned_removes_whole_units():
    model = _wide(10)
    graph = depgraph.dependency_graph(model, jnp.ones((1, 2)))
    params = nnx.state(model, nnx.Param)
    scores = fisher_optax.scores(params, "magnitude")
    pattern = depgraph.Groups(graph, scope="group")
    got = fisher_optax.select(scores, 0.3, pattern=pattern)
    want = depgraph.select_groups(graph, scores, 0.3, scope="group")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    # pruned grows the unit mask inside jit: 3 of 10 units at step 0, 6 at step 2
    opt = fisher_optax.pruned(
        optax.adam(1e-3),
        lambda t: jnp.where(t < 2, 0.3, 0.6),
        criterion="magnitude",
        pattern=pattern,
        update_every=2,
    )
    state = opt.init(params)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    grads = jax.tree.map(jnp.ones_like, params)
    for t in range(3):
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        gone = ~np.asarray(state.mask["layers"][0]["bias"][...])
        assert gone.sum() == (3 if t < 2 else 6)
        kernel = np.asarray(params["layers"][0]["kernel"][...])
        assert (
            not kernel[:, gone].any()
            and not np.asarray(params["layers"][2]["kernel"][...])[gone].any()
        )
    assert step._cache_size() == 1
    with pytest.raises(ValueError, match="prunable does not apply to Groups"):
        fisher_optax.select(scores, 0.3, pattern=pattern, prunable=lambda p, x: True)
    with pytest.raises(ValueError, match="Groups takes one scalar sparsity"):
        fisher_optax.select(scores, jax.tree.map(lambda x: 0.3, scores), pattern=pattern)
    with pytest.raises(TypeError, match="Groups\\(graph\\) takes the DepGraph"):
        fisher_optax.select(scores, 0.3, pattern=depgraph.Groups(model))


# --------------------------------------------------------------------------------------------
# Models the Sequential surgery covered: every one is cut exactly by the traced graph


def _init(seed):
    """NumPy initialisers (nothing to compile) with non-zero biases."""
    rng = np.random.default_rng(seed)

    def kernel(key, shape, dtype=jnp.float32):
        del key
        fan_in = int(np.prod(shape[:-1]))
        return jax.device_put(np.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype))

    def bias(key, shape, dtype=jnp.float32):
        del key
        return jax.device_put(np.asarray(0.5 * rng.standard_normal(shape), dtype))

    return {"kernel_init": kernel, "bias_init": bias, "rngs": nnx.Rngs(seed)}


def _flatten(x):
    return x.reshape(x.shape[0], -1)


def _mlp(act):
    i = _init(0)
    return nnx.Sequential(
        nnx.Linear(6, 12, **i), act, nnx.Linear(12, 9, **i), act, nnx.Linear(9, 3, **i)
    )


def _cnn(padding):
    i = _init(1)
    side = 4 if padding == "VALID" else 8  # of an 8x8 input after two 3x3 convs
    return nnx.Sequential(
        nnx.Conv(2, 6, (3, 3), padding=padding, **i), nnx.relu,
        nnx.Conv(6, 5, (3, 3), padding=padding, **i), jnp.tanh, _flatten,
        nnx.Linear(5 * side * side, 7, **i), nnx.gelu,
        nnx.Linear(7, 4, **i),
    )  # fmt: skip


class _Net(nnx.Module):
    def __init__(self, seed=0):
        i = _init(seed)
        self.conv1 = nnx.Conv(1, 4, (3, 3), padding="VALID", **i)
        self.conv2 = nnx.Conv(4, 6, (3, 3), padding="VALID", **i)
        self.fc1 = nnx.Linear(6 * 4, 5, **i)
        self.fc2 = nnx.Linear(5, 3, **i)

    def __call__(self, x):
        x = jax.nn.elu(self.conv1(x))
        x = jax.nn.elu(self.conv2(x))
        x = jax.nn.elu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


class _Residual(nnx.Module):
    def __init__(self):
        i = _init(11)
        self.fc1 = nnx.Linear(6, 8, **i)
        self.fc2 = nnx.Linear(8, 6, **i)
        self.out = nnx.Linear(6, 3, **i)

    def __call__(self, x):
        return self.out(x + self.fc2(jax.nn.relu(self.fc1(x))))


class _NormBetween(nnx.Module):
    def __init__(self):
        i = _init(13)
        self.fc1 = nnx.Linear(6, 8, **i)
        self.bn = nnx.BatchNorm(8, rngs=nnx.Rngs(0))
        self.fc2 = nnx.Linear(8, 3, **i)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.bn(self.fc1(x))))


def _pooled():
    i = _init(14)
    return nnx.Sequential(
        nnx.Conv(1, 4, (3, 3), padding="SAME", **i), nnx.relu,
        lambda x: nnx.avg_pool(x, (2, 2), strides=(2, 2)), _flatten,
        nnx.Linear(4 * 16, 3, **i),
    )  # fmt: skip


def _random_keep(graph, seed=0, fraction=0.4):
    rng = np.random.default_rng(seed)
    keep = []
    for g in graph.groups:
        k = rng.random(g.size) >= fraction
        k[rng.integers(g.size)] = True
        keep.append(k)
    return tuple(keep)


@pytest.mark.parametrize(
    ("build", "shape", "sizes"),
    [
        (lambda: _mlp(jax.nn.sigmoid), (16, 6), [12, 9]),
        (lambda: _mlp(nnx.relu), (16, 6), [12, 9]),
        (lambda: _cnn("VALID"), (4, 8, 8, 2), [6, 5, 7]),
        (lambda: _cnn("SAME"), (4, 8, 8, 2), [6, 5, 7]),  # a zero-padded conv consumer
        (lambda: _Net(5), (4, 6, 6, 1), [4, 6, 5]),
        (_Residual, (4, 6), [8]),  # fc2 writes into the input stream: kept whole
        (_NormBetween, (4, 6), [8]),  # BatchNorm between two layers
        (_pooled, (4, 8, 8, 1), [4]),  # average pooling, then flatten
    ],
)
def test_models_of_the_sequential_surgery_are_cut_exactly(build, shape, sizes):
    model = build()
    x = jax.random.normal(jax.random.key(0), shape)
    graph = depgraph.dependency_graph(model, x)
    assert sorted(g.size for g in graph.groups) == sorted(sizes)
    keep = _random_keep(graph)
    small = depgraph.cut(model, graph, keep)  # checked against the masked model inside
    np.testing.assert_allclose(
        run(small, x), run(depgraph.masked(model, graph, keep), x), rtol=1e-5, atol=1e-5
    )
    params = nnx.state(model, nnx.Param)
    kept = sum(int(np.sum(m)) for m in jax.tree.leaves(depgraph.weight_mask(graph, keep, params)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param))) == kept
    assert kept < sum(x.size for x in jax.tree.leaves(params))


def test_mlp_cut_counts_drop_exactly_and_the_original_is_untouched():
    model = _mlp(jax.nn.sigmoid)
    graph = depgraph.dependency_graph(model, jnp.ones((2, 6)))
    keep = _random_keep(graph, seed=3)
    small = depgraph.cut(model, graph, keep)
    k0, k1 = (int(k.sum()) for k in keep)
    want = (6 * k0 + k0) + (k0 * k1 + k1) + (k1 * 3 + 3)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param))) == want
    assert small.layers[0].out_features == k0 and small.layers[2].in_features == k0
    assert model.layers[0].kernel.shape == (6, 12)


def test_a_reduction_over_hidden_units_keeps_them_whole():
    class Shared(nnx.Module):
        """fc2 reads fc1's units and their mean: removing one changes the mean."""

        def __init__(self):
            i = _init(12)
            self.fc1 = nnx.Linear(6, 8, **i)
            self.fc2 = nnx.Linear(8, 3, **i)

        def __call__(self, x):
            h = jax.nn.relu(self.fc1(x))
            return self.fc2(h + h.mean(-1, keepdims=True))

    graph = depgraph.dependency_graph(Shared(), jnp.ones((2, 6)))
    assert graph.groups == ()
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['fc1']['kernel']", 1)].startswith("reduced by reduce_sum")


def test_softmax_between_layers_keeps_them_whole():
    i = _init(0)
    model = nnx.Sequential(nnx.Linear(3, 4, **i), jax.nn.softmax, nnx.Linear(4, 2, **i))
    graph = depgraph.dependency_graph(model, jnp.ones((2, 3)))
    assert graph.groups == ()
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['layers'][0]['kernel']", 1)].startswith("reduced by reduce_max")


class _LinenCNN(nn.Module):
    features: tuple = (6, 5, 7)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.features[0], (3, 3), padding="VALID", name="c1")(x))
        x = nn.relu(nn.Conv(self.features[1], (3, 3), padding="VALID", name="c2")(x))
        x = nn.relu(nn.Dense(self.features[2], name="d1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(4, name="d2")(x)


def test_linen_cnn_with_flatten_is_cut_exactly():
    from fisher_optax.flax import param_count_and_flops

    module = _LinenCNN()
    x = jax.random.normal(jax.random.key(8), (4, 8, 8, 2))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    variables = jax.tree.map(lambda p: p + 0.5 if p.ndim == 1 else p, variables)
    graph = depgraph.dependency_graph(module, x, variables=variables)
    keep = _random_keep(graph, seed=8)
    result = depgraph.cut(variables, graph, keep)
    p = result.variables["params"]
    small = _LinenCNN(features=tuple(p[n]["kernel"].shape[-1] for n in ("c1", "c2", "d1")))
    np.testing.assert_allclose(result.apply(x), small.apply(result.variables, x), atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(small.apply)(result.variables, x),
        jax.jit(module.apply)(depgraph.masked(variables, graph, keep), x),
        atol=1e-5,
    )
    n_small, f_small = param_count_and_flops(small.apply, x[:1], params=result.variables)
    n_dense, f_dense = param_count_and_flops(module.apply, x[:1], params=variables)
    assert n_small == sum(p.size for p in jax.tree.leaves(result.variables)) < n_dense
    assert f_small < f_dense


def test_linen_mlp_with_batchnorm_slices_the_optax_state():
    class MLP(nn.Module):
        widths: tuple = (8, 5)

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(self.widths[0])(x)
            x = jax.nn.sigmoid(nn.BatchNorm(use_running_average=True)(x))
            x = jax.nn.sigmoid(nn.Dense(self.widths[1])(x))
            return nn.Dense(2)(x)

    x = jax.random.normal(jax.random.key(9), (5, 3))
    variables = jax.jit(MLP().init)(jax.random.key(1), x)
    graph = depgraph.dependency_graph(MLP(), x, variables=variables)
    keep = tuple(np.arange(g.size) % 3 != 0 for g in graph.groups)
    result = depgraph.cut(variables, graph, keep)  # checked
    assert result.variables["batch_stats"]["BatchNorm_0"]["mean"].shape == (5,)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables["params"])
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, variables["params"]), opt_state)
    sliced = depgraph.cut_optimizer(opt_state, graph, keep)
    adam = optax.tree_utils.tree_get(sliced, "ScaleByAdamState")
    assert adam.mu["Dense_1"]["kernel"].shape == (5, 3) and int(adam.count) == 1
    np.testing.assert_array_equal(
        adam.nu["Dense_0"]["kernel"],
        np.asarray(opt_state[0].nu["Dense_0"]["kernel"])[:, keep[0]],
    )
    tx.update(jax.tree.map(jnp.ones_like, result.variables["params"]), sliced)  # it steps


def test_cut_optimizer_with_pruned_fine_tunes_under_jit():
    model = _mlp(nnx.relu)
    tx = fisher_optax.pruned(
        optax.adam(1e-2), schedule=0.3, method="one_stage", criterion="magnitude", update_every=2
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(6), (16, 6))
    y = jnp.arange(16) % 3
    traces = []

    @nnx.jit
    def step(model, opt, x, y):
        traces.append(1)
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        step(model, opt, x, y)
    graph = depgraph.dependency_graph(model, x)
    keep = _random_keep(graph, seed=6)
    small = depgraph.cut(model, graph, keep)
    small_opt = depgraph.cut_optimizer(opt, graph, keep, model=small)
    index = depgraph._cut_index(graph, keep)
    old_adam = optax.tree_utils.tree_get(opt.opt_state, "ScaleByAdamState")
    new_adam = optax.tree_utils.tree_get(small_opt.opt_state, "ScaleByAdamState")
    old_pruned = optax.tree_utils.tree_get(opt.opt_state, "PrunedState")
    new_pruned = optax.tree_utils.tree_get(small_opt.opt_state, "PrunedState")
    pairs = [(old_adam.mu, new_adam.mu), (old_adam.nu, new_adam.nu)]
    for old_tree, new_tree in [*pairs, (old_pruned.mask, new_pruned.mask)]:
        for (path, leaf), new_leaf in zip(
            jax.tree_util.tree_flatten_with_path(old_tree)[0],
            jax.tree.leaves(new_tree),
            strict=True,
        ):
            want = np.asarray(leaf)
            for a, k in enumerate(index.get(depgraph._path_tuple(path), ())):
                if k is not None:
                    want = np.take(want, k, axis=a)
            np.testing.assert_array_equal(np.asarray(new_leaf), want)
    assert int(new_adam.count[...]) == int(old_adam.count[...]) == 3
    assert int(small_opt.step[...]) == 3
    losses = [float(step(small, small_opt, x, y)) for _ in range(4)]
    assert len(traces) == 2  # once for the dense model, once for the cut one
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    mask = optax.tree_utils.tree_get(small_opt.opt_state, "PrunedState").mask
    for p, m in zip(
        jax.tree.leaves(nnx.state(small, nnx.Param)), jax.tree.leaves(mask), strict=True
    ):
        assert not np.any(np.asarray(p)[~np.asarray(m)])


class Wrapped(nnx.Module):
    """Layers called through jax.jit, jax.checkpoint and a custom_jvp activation: the walker
    inlines each body, so the channels are followed through them."""

    def __init__(self, rngs):
        self.a = nnx.Linear(3, 6, rngs=rngs)
        self.b = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        h = jax.jit(lambda k, b, x: x @ k + b)(self.a.kernel[...], self.a.bias[...], x)
        h = jax.checkpoint(jax.nn.relu)(h)  # relu is a custom_jvp
        return self.b(jax.jit(jnp.tanh)(h))


def test_calls_jit_checkpoint_and_custom_jvp_are_followed():
    model = Wrapped(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 3))
    graph = depgraph.dependency_graph(model, x)
    assert _members(graph) == [
        [("['a']['bias']", 0), ("['a']['kernel']", 1), ("['b']['kernel']", 0)]
    ]
    keep = _keep_half(graph)
    small = depgraph.cut(model, graph, keep)
    np.testing.assert_allclose(small(x), depgraph.masked(model, graph, keep)(x), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Language models and stacks: call arguments, embeddings, scans, exact and inexact cuts


class NnxLM(nnx.Module):
    """Embedding, one pre-norm block (attention, MLP), a tied output; Rngs kept inside."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = 11, d: int = 8, mlp: int = 12):
        self.rngs = rngs
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(6, d, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, d, qkv_features=8, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, tokens, positions, cache, mask, *, scale=1.0):
        """Called as the NNX Gemma is; ``cache`` is ``None`` outside decoding."""
        del cache
        x = self.embed(tokens) + self.pos(positions)
        x = x + self.drop(self.attn(self.ln1(x), mask=mask))
        x = x + self.down(nnx.gelu(self.up(self.ln2(x)))) * scale
        return self.embed.attend(x)


def _lm_call():
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 11)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    return tokens, positions, nnx.make_causal_mask(tokens)


def test_nnx_lm_with_call_arguments_exact_and_inexact_cuts():
    model = NnxLM(nnx.Rngs(0))
    tokens, positions, mask = _lm_call()
    graph = depgraph.dependency_graph(model, tokens, positions, None, mask, scale=0.5)
    assert graph.exact
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    why = reasons[("['embed']['embedding']", 1)]
    assert "LayerNorm" in why and "exact=False" in why, why
    assert why.startswith("reduced by reduce_sum in _compute_stats at nn/normalization.py:"), why
    # the norm's scale and the down projection writing into the stream name the same cause
    for path, axis in (("['ln1']['scale']", 0), ("['down']['kernel']", 1)):
        assert why.startswith(reasons[(path, axis)]), reasons[(path, axis)]
    assert "gather indexes" in reasons[("['embed']['embedding']", 0)]
    sizes = sorted(g.size for g in graph.groups)
    assert sizes == [2, 12]  # heads and MLP units; the stream is kept whole
    small = depgraph.cut(model, graph, _keep_half(graph))  # exact: checked against masked
    removed = _n_params(model) - _n_params(small)
    # one head of two: query/key/value kernels 3 x 8x4 and biases 3 x 4, out kernel 4x8;
    # six MLP units of twelve: up 8x6 and its bias 6, down 6x8
    assert removed == 3 * 32 + 3 * 4 + 32 + 48 + 6 + 48

    inexact = depgraph.dependency_graph(
        model, tokens, positions, None, mask, exact=False, scale=0.5
    )
    stream = [g for g in inexact.groups if "['embed']['embedding']" in dict(g.members)]
    assert len(stream) == 1 and stream[0].size == 8 and not inexact.exact
    members = dict(stream[0].members)
    assert members["['ln1']['scale']"] == 0 and members["['down']['kernel']"] == 1
    keep = tuple(np.arange(g.size) % 4 != 3 for g in inexact.groups)
    cut_model = depgraph.cut(model, inexact, keep)  # checked for shapes and that it runs
    assert cut_model.embed.embedding.shape == (11, 6) and cut_model.ln1.num_features == 6
    # 2 of the stream's 8 features (columns of both embeddings, both norms, the attention's
    # input and output features, the MLP's input and output) and 3 of 12 MLP units; the two
    # heads stay: 197 of 668 parameters
    assert _n_params(model) - _n_params(cut_model) == 197

    # the cut through the norms changes the function; a few steps of distillation towards
    # the dense model's next-token distribution recover part of it
    target = jax.nn.log_softmax(_apply_lm(model, tokens, positions, None, mask))
    cut_model.eval()

    def kl(m):
        logp = jax.nn.log_softmax(m(tokens, positions, None, mask))
        return jnp.mean(jnp.sum(jnp.exp(target) * (target - logp), axis=-1))

    opt = nnx.Optimizer(cut_model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(kl)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(cut_model, opt)) for _ in range(10)]
    assert losses[0] > 0.05 and losses[-1] < 0.5 * losses[0], losses


def _n_params(model):
    """The parameter count of an NNX model or of a Linen ``params`` tree."""
    tree = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    return sum(x.size for x in jax.tree.leaves(tree))


def _apply_lm(model, *args):
    return depgraph._apply(model, (args, {}))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(10, name="up")(x)
        return x + nn.Dense(x.shape[-1], name="down")(nn.relu(h)), None


class LinenScanLM(nn.Module):
    """Stacked blocks by nn.scan; a ``cache`` collection written only when decoding."""

    @nn.compact
    def __call__(self, tokens, *, decode=False):
        embed = nn.Embed(7, 6, name="embed")
        x = embed(tokens)
        if decode:
            self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        stack = nn.scan(
            LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = stack(name="blocks")(x, None)
        return embed.attend(x)


def test_linen_scan_lm_couples_units_across_layers_and_runs_cut():
    tokens = jax.random.randint(jax.random.key(0), (2, 4), 0, 7)
    module = LinenScanLM()
    variables = module.init(jax.random.key(1), tokens, decode=True)
    assert "cache" in variables
    graph = depgraph.dependency_graph(module, tokens, variables=variables, decode=False)
    by_name = {g.name: g for g in graph.groups}
    up = by_name["['params']['blocks']['up']['kernel'][2]"]
    assert up.size == 10  # one unit is the same index in all 3 layers
    one = tuple(np.arange(g.size) != 4 if g is up else np.ones(g.size, bool) for g in graph.groups)
    gone = ~np.asarray(
        depgraph.weight_mask(graph, one, variables["params"])["blocks"]["up"]["kernel"]
    )
    assert gone.shape == (3, 6, 10) and gone[:, :, 4].all() and gone.sum() == 3 * 6
    stream = [g for g in graph.groups if "['params']['embed']['embedding']" in dict(g.members)]
    assert len(stream) == 1 and stream[0].size == 6  # no norm: the stream is cut exactly
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['params']['blocks']['up']['kernel']", 0)].startswith("the scanned axis")
    keep = tuple(np.arange(g.size) % 3 != 0 for g in graph.groups)
    result = depgraph.cut(variables, graph, keep)  # checked against the masked model
    p = result.variables["params"]
    assert p["blocks"]["up"]["kernel"].shape == (3, 4, 6)
    assert p["embed"]["embedding"].shape == (7, 4)
    assert result.variables["cache"]["index"].shape == ()  # other collections carried over
    # 2 of the stream's 6 features (the tied embedding, every layer's down kernel and bias,
    # up kernel rows) and 4 of 10 hidden units in each of the 3 layers: 248 of 450
    assert _n_params(variables["params"]) - _n_params(result.variables["params"]) == 248
    assert result.apply(tokens).shape == (2, 4, 7)


class LinenResNet(nn.Module):
    axis_name: str | None = "batch"

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, axis_name=self.axis_name
        )
        y = nn.relu(norm()(nn.Conv(4, (3, 3))(x)))
        y = norm()(nn.Conv(4, (3, 3))(y))
        return nn.Dense(3)(jnp.mean(nn.relu(y + x), axis=(1, 2)))


def test_linen_resnet_takes_train_false_and_names_the_axis_name_otherwise():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    module = LinenResNet()
    variables = module.init(jax.random.key(1), x, train=False)
    with pytest.raises(ValueError, match=r"collective over the axis name 'batch'.*train=False"):
        depgraph.dependency_graph(module, x, variables=variables)
    with pytest.raises(ValueError, match=r"updates a variable collection .*train=False"):
        depgraph.dependency_graph(LinenResNet(axis_name=None), x, variables=variables)
    graph = depgraph.dependency_graph(module, x, variables=variables, train=False)
    assert sorted(g.size for g in graph.groups) == [4]
    result = depgraph.cut(variables, graph, (np.arange(4) < 2,))  # checked
    assert result.variables["batch_stats"]["BatchNorm_0"]["mean"].shape == (2,)
    # the block's inner channels (its input is the model input, kept whole): 150 of 327
    assert _n_params(variables["params"]) - _n_params(result.variables["params"]) == 150
    assert result.apply(x, train=False).shape == (2, 3)


class LinenDecoder(nn.Module):
    """An MLP that writes its input to a ``cache`` collection, as a decoder does."""

    @nn.compact
    def __call__(self, x):
        cached = self.variable("cache", "cached_x", jnp.zeros, x.shape)
        cached.value = x
        return nn.Dense(3)(nn.relu(nn.Dense(6)(x)))


def test_linen_cache_written_by_the_forward_is_passed_as_mutable():
    x = jax.random.normal(jax.random.key(0), (2, 4))
    module = LinenDecoder()
    variables = module.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match=r"by design .*mutable=\['cache'\]"):
        depgraph.dependency_graph(module, x, variables=variables)
    graph = depgraph.dependency_graph(module, x, variables=variables, mutable=["cache"])
    assert [g.size for g in graph.groups] == [6]
    result = depgraph.cut(variables, graph, (np.arange(6) < 3,))  # checked
    # Dense(3) is built before the Dense(6) in its argument: Dense_0 is the output layer.
    assert result.variables["params"]["Dense_1"]["kernel"].shape == (4, 3)
    assert result.variables["params"]["Dense_0"]["kernel"].shape == (3, 3)
    assert result.variables["cache"]["cached_x"].shape == (2, 4)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(4, 6, rngs=rngs)
        self.down = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.relu(self.up(x)))


class NnxStack(nnx.Module):
    """Three blocks created by nnx.vmap (stacked variables) and applied by nnx.scan."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return NnxBlock(rngs)

        self.blocks = blocks(rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.head(body(x, self.blocks))


def test_nnx_vmap_stack_applied_by_scan_cuts_the_same_unit_in_every_layer():
    model = NnxStack(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4))
    graph = depgraph.dependency_graph(model, x)
    assert _members(graph) == [
        [
            ("['blocks']['down']['kernel']", 1),
            ("['blocks']['up']['bias']", 1),
            ("['blocks']['up']['kernel']", 2),
        ]
    ]
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['blocks']['up']['kernel']", 0)].startswith("the scanned axis")
    keep = (np.arange(6) % 3 != 0,)
    small = depgraph.cut(model, graph, keep)  # checked against the masked model
    assert small.blocks.up.kernel.shape == (3, 4, 4) and small.blocks.down.kernel.shape == (3, 4, 4)
    assert small.blocks.up.out_features == 4
    # 2 of 6 hidden units in each of the 3 layers: up kernel and bias, down kernel
    assert _n_params(model) - _n_params(small) == 3 * (2 * 4 + 2 + 2 * 4)


class NnxEnsemble(nnx.Module):
    """Three members created and applied by nnx.vmap: no scan, the layer axis is a batch."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def members(rngs):
            return nnx.Linear(4, 6, rngs=rngs)

        self.members = members(rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.vmap(in_axes=(0, None), out_axes=0)
        def each(member, x):
            return nnx.relu(member(x))

        return self.head(each(self.members, x).mean(axis=0))


def test_nnx_vmap_applied_members_keep_their_layer_axis_and_say_so():
    graph = depgraph.dependency_graph(NnxEnsemble(nnx.Rngs(0)), jnp.ones((2, 4)))
    assert [(g.name, g.size) for g in graph.groups] == [("['members']['kernel'][2]", 6)]
    reasons = {(f.path, f.axis): f.reason for f in graph.frozen}
    assert reasons[("['members']['kernel']", 0)] == (
        "axis 0 of 'kernel' (3, 4, 6): an axis the Linear at ['members'] cannot resize, a "
        "leading axis (the layer axis of a module stacked by nnx.vmap, nnx.scan or nn.scan): "
        "the cut keeps every layer"
    )
