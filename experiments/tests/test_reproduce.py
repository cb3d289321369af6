"""CI smoke test of experiments/reproduce.py: the whole pipeline at a tiny size, so it cannot rot.

Also the seams of the split: the models' parameter counts (experiments/models.py) and the report
(experiments/report.py) re-rendering a run from its JSON alone.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fisher_optax
from experiments import models, report, reproduce

PAGE = """# title

before
<!-- results:oneshot:digits:begin -->
old text
<!-- results:oneshot:digits:end -->
after
<!-- results:oneshot:fashion-mnist:begin -->
keep me
<!-- results:oneshot:fashion-mnist:end -->
"""


def test_quick_pipeline_end_to_end(tmp_path):
    page = tmp_path / "oneshot.md"
    page.write_text(PAGE)
    out = tmp_path / "results"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    argv = ["--quick", "--out", str(out), "--write-docs", "--docs-page", str(page), *cache]
    record = reproduce.main(argv)
    assert not record["runs"][0]["prune_phase_cached"]

    data = json.loads((out / "digits.json").read_text())
    assert set(data) >= {"config", "meta", "wall_time_s", "runs", "summary", "reading"}
    assert data["config"]["argv"] == argv
    assert data["config"]["seeds"] == [0] and data["config"]["sparsities"] == [0.5, 0.9]
    (run,) = data["runs"]
    assert 0.0 <= run["dense_acc"] <= 1.0
    for setting in reproduce.SETTINGS:
        for method in reproduce.METHODS:
            for ft in ("no_ft", "ft"):
                accs = run["pruning"][setting][method][ft]
                assert set(accs) == {"0.5", "0.9"}
                assert all(0.0 <= a <= 1.0 for a in accs.values())
        # The masks prune exactly the requested share of the prunable kernels.
        for sp in ("0.5", "0.9"):
            assert run["achieved_sparsity"][setting][sp]["prunable"] == pytest.approx(
                float(sp), abs=1e-3
            )
    for qm in reproduce.QUANT_METHODS:
        cell = run["quantization"][qm]["2"]
        # The ratio is measured on the file save_compressed wrote; the report agrees with it.
        assert cell["bytes"] == cell["report_bytes"] > 0
        assert cell["stream_bytes"]["codes"] > 0 and cell["stream_bytes"]["positions"] > 0
        assert cell["ratio"] == pytest.approx(4 * record["meta"]["n_params"] / cell["bytes"])
        assert cell["avg_bits"] <= 2.0 + 1e-6
    assert data["summary"]["pruning"]["fc"]["ft"]["0.9"]["two_stage"]["std"] == 0.0
    assert any("Deep Compression" in line or "No quantized" in line for line in data["reading"])

    for png in ("digits_sparsity.png", "digits_pareto.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = page.read_text()
    assert "old text" not in text and "keep me" in text
    assert text.startswith("# title\n\nbefore\n<!-- results:oneshot:digits:begin -->\n")
    assert text.endswith("<!-- results:oneshot:digits:end -->\nafter\n" + PAGE.split("after\n")[1])
    section = text.split("results:oneshot:digits:begin -->")[1].split("<!-- results:oneshot")[0]
    assert "python -m experiments.reproduce --quick" in section
    assert "| sparsity | magnitude | fisher | saliency | two_stage | random |" in section

    # --render-only recomputes nothing (report.py alone, from the JSON): the same summary and
    # the same docs section.
    page2 = tmp_path / "oneshot2.md"
    page2.write_text(PAGE)
    argv2 = ["--quick", "--out", str(out), "--render-only", "--no-plots", "--write-docs"]
    again = reproduce.main([*argv2, "--docs-page", str(page2)])
    assert again["summary"] == record["summary"]
    assert page2.read_text() == text

    # A rerun with --cache-dir loads the pruning phase (and recompiles nothing: same process).
    cached = reproduce.main(["--quick", "--out", str(tmp_path / "again"), "--no-plots", *cache])
    (run2,) = cached["runs"]
    assert run2["prune_phase_cached"] and run2["pruning"] == run["pruning"]
    assert run2["quantization"] == run["quantization"]


def test_write_section_needs_both_markers(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("# no markers here\n")
    assert not report.write_section(page, "oneshot:digits", "new")
    assert page.read_text() == "# no markers here\n"
    page.write_text("<!-- results:oneshot:digits:end -->\n<!-- results:oneshot:digits:begin -->\n")
    assert not report.write_section(page, "oneshot:digits", "new")
    assert "lacks one pair" in capsys.readouterr().out
    assert not report.write_section(tmp_path / "absent.md", "oneshot:digits", "new")
    assert "not found" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("page", "key"),
    [
        ("main-digits.md", "main:digits"),
        ("main-fashion-mnist.md", "main:fashion-mnist"),
        ("oneshot.md", "oneshot:digits"),
        ("oneshot.md", "oneshot:fashion-mnist"),
    ],
)
def test_the_docs_pages_the_commands_write_have_their_markers(page, key):
    # --write-docs without --docs-page writes these pages: a lost marker would make the
    # command skip the page (with a message only), so the figures would go stale silently.
    text = (reproduce.REPO / "docs" / "results" / page).read_text()
    begin, end = f"<!-- results:{key}:begin -->", f"<!-- results:{key}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    assert text.index(begin) < text.index(end)


def test_markdown_escapes_a_bar_inside_a_cell():
    table = report.markdown([["method", "ratio"], ["magnitude |w|", "1.0x"]])
    assert table.splitlines() == ["| method | ratio |", "|---|---|", "| magnitude \\|w\\| | 1.0x |"]


def test_select_mask_equals_the_named_mask_functions():
    """The one compiled selection used by the sweep gives the library's own masks."""
    # Two layers keep the compilations cheap (their cost grows with the number of leaves).
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {
        "conv1": {"kernel": jax.random.normal(k1, (3, 3, 1, 4)), "bias": jnp.zeros(4)},
        "fc1": {"kernel": jax.random.normal(k2, (6, 5)), "bias": jnp.zeros(5)},
    }
    fisher = jax.tree.map(lambda x: jnp.abs(jnp.sin(7 * x)) + 1e-3, params)
    key = jax.random.key(5, impl=reproduce.PRNG_IMPL)
    for setting in ("all",):  # "fc" differs only in prunable; each eager call compiles
        prunable = models.prunable_tree(params, setting)
        got = reproduce.all_masks(params, fisher, 0.6, 0.5, key, setting)
        kw = dict(prunable=prunable)
        want = {
            "magnitude": fisher_optax.magnitude_mask(params, 0.6, **kw),
            "fisher": fisher_optax.select(
                fisher_optax.scores(params, "fisher", fisher=fisher), 0.6, **kw
            ),
            "saliency": fisher_optax.select(
                fisher_optax.scores(params, "saliency", fisher=fisher), 0.6, **kw
            ),
            "two_stage": fisher_optax.two_stage_mask(
                params, 0.6, fisher=fisher, magnitude_fraction=0.5, **kw
            ),
            "random": fisher_optax.select(
                fisher_optax.scores(params, "random", key=key), 0.6, **kw
            ),
        }
        for method in reproduce.METHODS:
            for a, b in zip(
                jax.tree.leaves(got[method]), jax.tree.leaves(want[method]), strict=True
            ):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=method)


def test_pareto_front():
    pts = [(1.0, 0.5, "a"), (2.0, 0.4, "b"), (2.0, 0.7, "c"), (3.0, 0.7, "d"), (4.0, 0.9, "e")]
    assert [p[2] for p in report.pareto(pts)] == ["a", "c", "e"]


def test_parse_lists():
    assert reproduce.parse_floats("50,0.9,99") == (0.5, 0.9, 0.99)
    assert reproduce.parse_ints("2-5") == (2, 3, 4, 5)
    assert reproduce.parse_ints("0,2") == (0, 2)


def test_other_mnist_format_needs_data_dir():
    args = reproduce.build_parser().parse_args(["--dataset", "mnist"])
    with pytest.raises(SystemExit, match="--data-dir"):
        reproduce.load_data(args)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("digits-cnn", 13_706),
        ("small-lenet", 70_934),
        ("lenet5", 431_080),
        ("lenet-300-100", 266_610),
    ],
)
def test_model_parameter_counts(name, count):
    """The counts Deep Compression and LeCun et al. give (abstract shapes: nothing compiles)."""
    model = models.MODELS[name]
    shape = (8, 8, 1) if name == "digits-cnn" else (28, 28, 1)
    params = jax.eval_shape(lambda k: model.init(k, shape), jax.random.key(0))
    assert models.n_params(params) == count
    logits = jax.eval_shape(lambda p, x: models.apply(model, p, x), params, jnp.zeros((2, *shape)))
    assert logits.shape == (2, 10)
    # "fc" prunes the dense kernels only; for the MLP that is every kernel.
    fc = models.prunable_tree(params, "fc")
    assert fc["fc1"] == {"kernel": True, "bias": False}
    assert ("conv1" in fc) == (name != "lenet-300-100")
    if "conv1" in fc:
        assert fc["conv1"]["kernel"] is False
        assert models.prunable_tree(params, "all")["conv1"]["kernel"] is True


def test_lenet5_layers_are_caffes():
    params = jax.eval_shape(
        lambda k: models.MODELS["lenet5"].init(k, (28, 28, 1)), jax.random.key(0)
    )
    shapes = {k: v["kernel"].shape for k, v in params.items()}
    assert shapes == {
        "conv1": (5, 5, 1, 20),
        "conv2": (5, 5, 20, 50),
        "fc1": (800, 500),
        "fc2": (500, 10),
    }


def test_old_records_name_their_model():
    """A record written before the model split (the CNN by its fields) still renders."""
    cfg = reproduce.make_config(reproduce.build_parser().parse_args(["--quick"]))
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    d["model"] = {"kernel": 5, "padding": "VALID", "conv": [6, 16], "fc": 256, "classes": 10}
    assert reproduce.config_from_dict(d).model == "small-lenet"
    d["model"] = "lenet5"
    assert reproduce.config_from_dict(d) == dataclasses.replace(cfg, model="lenet5")
