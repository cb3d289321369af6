"""CI smoke test of experiments/structured_job.py (the pipeline at a tiny size) and its seams."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import structured_job, structured_models
from fisher_optax import depgraph

PAGE = """# t
<!-- results:structured:begin -->
OLD-SECTION-TEXT
<!-- results:structured:end -->
tail
"""


def _resnet_params(widths: dict[str, int], width: int, classes: int = 10) -> int:
    """Parameters of the one-block-per-stage ResNet, counted by hand from the kept units."""
    s = [widths["['blocks'][0]['conv2']"], widths["['blocks'][1]['conv2']"],
         widths["['blocks'][2]['conv2']"]]  # fmt: skip
    c = [widths["['blocks'][0]['conv1']"], widths["['blocks'][1]['conv1']"],
         widths["['blocks'][2]['conv1']"]]  # fmt: skip
    n = 9 * s[0] + s[0] + 2 * s[0]  # stem conv and its BatchNorm
    cin = s[0]
    for k in range(3):
        n += 9 * cin * c[k] + c[k] + 2 * c[k]  # conv1, bn1
        n += 9 * c[k] * s[k] + s[k] + 2 * s[k]  # conv2, bn2
        if k > 0:
            n += cin * s[k] + s[k]  # the 1x1 projection shortcut
        cin = s[k]
    return n + cin * classes + classes


def test_quick_run_end_to_end_cache_and_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    out = tmp_path / "results"
    argv = ["--quick", "--models", "resnet", "--seeds", "0", "--criteria", "saliency,taylor"]
    argv += ["--out", str(out), "--no-plots", "--write-docs", "--docs-page", str(page)]
    record = structured_job.main(argv)
    (run,) = record["models"]["resnet"]["seeds"]
    cfg = record["models"]["resnet"]["config"]
    assert record["criteria"] == ["saliency", "taylor"] and run["exact"]
    widths = dict(cfg["arch"])["width"]
    names = [g["name"].split("['kernel']")[0] for g in run["groups"]]
    for c in ("saliency", "taylor"):
        assert len(run["criteria"][c]) == len(cfg["levels"])
        for i, lv in enumerate(run["criteria"][c]):
            # every criterion cuts every group by the same count: the timed architecture
            assert lv["units_kept"] == run["timing"]["units_kept"][i]
            sizes = [g["size"] for g in run["groups"]]
            kept = lv["units_kept"]
            assert kept == [round(n * (1 - lv["level"])) for n in sizes]
            assert lv["n_params"] == _resnet_params(dict(zip(names, kept, strict=True)), widths)
            assert lv["cut_accuracy"] == lv["pruned_accuracy"]  # an exact cut
            assert 0 <= lv["accuracy"] <= 100
    assert run["timing"]["n_params"] == _resnet_params(
        dict(zip(names, [g["size"] for g in run["groups"]], strict=True)), widths
    )
    assert all(t > 0 for b in ("1", "256") for t in run["timing"]["batch"][b]["cut"])
    text = page.read_text()
    assert "OLD-SECTION-TEXT" not in text and text.endswith("tail\n")
    assert "**resnet**" in text and "saliency minus L1" not in text  # no l1 in this run
    assert json.loads((out / "structured-quick.json").read_text())["models"]["resnet"]

    # A rerun reads every phase from the cache: the same numbers, no new cache entry.
    entries = sorted(p.name for p in (out / "cache").iterdir())
    again = structured_job.main(argv)
    assert sorted(p.name for p in (out / "cache").iterdir()) == entries
    assert again["models"]["resnet"]["seeds"][0]["criteria"] == run["criteria"]
    assert again["models"]["resnet"]["seeds"][0]["timing"] == run["timing"]


def test_taylor_and_l1_scores_against_numpy():
    params = {"w": jnp.asarray([[0.5, -2.0], [1.5, 0.0]])}
    opt = optax.adam(1e-3)
    state = opt.init(params)
    grads = [{"w": jnp.asarray([[1.0, 2.0], [-3.0, 4.0]])}, {"w": jnp.full((2, 2), 0.5)}]
    for g in grads:
        _, state = opt.update(g, state, params)
    mu = np.zeros((2, 2))
    for g in grads:
        mu = 0.9 * mu + 0.1 * np.asarray(g["w"])
    want = np.abs(mu / (1 - 0.9**2) * np.asarray(params["w"]))
    got = structured_job.weight_scores(params, state, None, criterion="taylor", batch_size=1)
    np.testing.assert_allclose(got["w"], want, rtol=1e-6)
    got = structured_job.weight_scores(params, state, None, criterion="l1", batch_size=1)
    np.testing.assert_array_equal(got["w"], np.abs(np.asarray(params["w"])))


def test_kept_units_read_back_the_mask_of_group_mask():
    model = structured_models.make_resnet(4, 0, blocks=1, stem_stride=2)
    model.eval()
    graph = depgraph.dependency_graph(model, jnp.zeros((2, 8, 8, 1)))
    params = nnx.state(model, nnx.Param)
    keep = depgraph.group_mask(graph, depgraph.group_scores(graph, params, "magnitude"), 0.5)
    mask = depgraph.weight_mask(graph, keep, params)
    got = structured_job.kept_units(graph, mask)
    assert all(np.array_equal(g, k) for g, k in zip(got, keep, strict=True))


def _fake_model_record(dense, acc, speed256):
    """A record of one model with two seeds and two levels, for the reading's arithmetic."""
    seeds = []
    for k, d in enumerate(dense):
        timing = {"batch": {b: {"dense": 1.0, "cut": [1.0 / s[k] for s in speed256]}
                            for b in ("1", "256")}}  # fmt: skip
        crit = {c: [{"accuracy": a[k], "pruned_accuracy": a[k], "cut_accuracy": a[k]}
                    for a in acc[c]] for c in acc}  # fmt: skip
        seeds.append({"dense": {"accuracy": d}, "timing": timing, "criteria": crit})
    return {"config": {"levels": [0.3, 0.6]}, "seeds": seeds}


def test_largest_speedup_within_a_point_and_paired_difference():
    acc = {
        "saliency": [[90.5, 90.0], [89.5, 88.0]],  # level 0.6 within 1 point for seed 0 only
        "l1": [[89.0, 89.9], [85.0, 84.0]],
    }
    rec = _fake_model_record([90.0, 91.0], acc, speed256=[[1.5, 1.6], [2.5, 2.4]])
    s = structured_job.summarize(rec, ["saliency", "l1"])
    np.testing.assert_allclose(s["criteria"]["saliency"]["best"], [2.5, 1.6])
    np.testing.assert_allclose(s["criteria"]["l1"]["best"], [1.5, 1.0])
    np.testing.assert_allclose(s["saliency_minus_l1"], [[1.5, 0.1], [4.5, 4.0]])
    assert structured_job._beyond_noise([4.5, 4.0]) and not structured_job._beyond_noise([1.5, 0.1])


def test_unknown_model_and_criterion_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--models: unknown model 'lenet'; choose from"):
        structured_job.main(["--quick", "--models", "lenet", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--criteria: unknown criterion 'hessian'; choose from"):
        structured_job.main(["--quick", "--criteria", "hessian", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_models_trace_into_the_documented_groups():
    vit = structured_models.make_vit(8, 0, depth=1, heads=2, mlp=6, patch=4, image=8)
    vit.eval()
    x = jnp.zeros((2, 8, 8, 1))
    exact = depgraph.dependency_graph(vit, x)
    assert sorted(g.size for g in exact.groups) == [2, 6]  # heads, MLP units
    inexact = depgraph.dependency_graph(vit, x, exact=False)
    assert sorted(g.size for g in inexact.groups) == [2, 6, 8] and not inexact.exact
    keep = tuple(np.arange(g.size) % 2 == 0 for g in inexact.groups)
    small = depgraph.cut(vit, inexact, keep)
    assert small.embed.out_features == 4 and small.pos.embedding.shape == (4, 4)
    assert jax.eval_shape(small, x).shape == (2, 10)
