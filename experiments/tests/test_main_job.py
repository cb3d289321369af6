"""CI smoke test of experiments/main_job.py (the whole pipeline at a tiny size) and its seams."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fisher_optax
from experiments import main_job, main_report, models

PAGE = """# t
<!-- results:main:digits:begin -->
OLD-SECTION-TEXT
<!-- results:main:digits:end -->
tail
"""


def test_quick_pipeline_end_to_end_and_cache(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    out = tmp_path / "results"
    argv = ["--quick", "--out", str(out), "--no-plots", "--write-docs", "--docs-page", str(page)]
    argv += ["--entry-bits", "40"]  # not the digits preset's 0: the workers must receive it
    # The first run computes in a worker process (--jobs), the report is assembled from the
    # cache it filled; the rerun below, in this process, must read the same numbers.
    record = main_job.main([*argv, "--jobs", "2"])
    assert record["jobs"] == 2
    assert record["models"]["digits-cnn"]["config"]["entry_bits"] == 40
    cached = sorted((out / "cache").iterdir())
    # One quantized point per method (QUICK: one level, one setting), all from the workers:
    # had they quantized with another entry_bits, this process would have added its own.
    assert len([p for p in cached if p.name.startswith("quant-") and p.suffix == ".json"]) == 4
    data = json.loads((out / "digits-main.json").read_text())
    (run,) = data["models"]["digits-cnn"]["seeds"]
    n = models.n_params(models.MODELS["digits-cnn"].init(jax.random.key(0), (8, 8, 1)))
    assert run["dense"]["n_params"] == n
    assert set(run["methods"]) == set(main_job.METHODS)
    for method, res in run["methods"].items():
        levels = res["levels"]
        assert [lv["level"] for lv in levels] == list(main_job.QUICK["levels"])
        # Pruned while training to each level of the staircase: the kernels' sparsity is
        # the target (deep_compression: its per-layer rates scaled to the same overall level).
        tol = 1e-3 if method != "deep_compression" else 0.02
        for lv in levels:
            assert lv["sparsity"] == pytest.approx(lv["level"], abs=tol), method
        for p in res["quantized"]:
            # The ratio is that of the file written; the accuracy that of the loaded file.
            assert p["ratio"] == pytest.approx(4 * n / p["bytes"])
            assert 0 <= p["accuracy"] <= 100
    assert "OLD-SECTION-TEXT" not in page.read_text() and "digits-cnn" in page.read_text()
    assert "tail" in page.read_text()
    # A rerun reads every phase from the cache: same numbers.
    again = main_job.main(argv)
    strip = lambda r: [
        [(m, [p["accuracy"] for p in v["quantized"]]) for m, v in s["methods"].items()]
        for s in r["models"]["digits-cnn"]["seeds"]
    ]
    assert strip(again) == strip(record)
    assert sorted((out / "cache").iterdir()) == cached  # every phase was a hit


def test_staircase_ramps_and_holds():
    f = main_job.staircase((0.5, 0.8), ramp=10, hold=5)
    got = [float(f(t)) for t in (0, 5, 10, 15, 20, 25, 30, 40)]
    np.testing.assert_allclose(got, [0, 0.25, 0.5, 0.5, 0.65, 0.8, 0.8, 0.8], atol=1e-6)


def test_han_targets_give_table_3_at_its_progress():
    params = models.MODELS["lenet5"].init(jax.random.key(0), (28, 28, 1))
    targets, table3 = main_job.han_targets(params)
    got = {k: v["kernel"] * table3 for k, v in targets.items()}
    assert got == pytest.approx(main_job.HAN_RATES["cnn"])
    assert max(v["kernel"] for v in targets.values()) == pytest.approx(0.995)
    assert all(v["bias"] == 0 for v in targets.values())
    # 8% of LeNet-5's kernels kept overall (Han et al., Table 3).
    assert main_job.overall_han(params) == pytest.approx(0.92, abs=0.005)


def test_deep_compression_pruning_reaches_the_per_layer_rates():
    cfg = main_job.Config(
        dataset="t",
        model="lenet-300-100",
        seed=0,
        **{
            **main_job.PRESETS["lenet-300-100"],
            "levels": (
                main_job.overall_han(
                    models.MODELS["lenet-300-100"].init(jax.random.key(0), (28, 28, 1))
                ),
            ),
            "ramp": 2,
            "hold": 2,
            "update_every": 1,
        },
    )
    params = models.MODELS["lenet-300-100"].init(jax.random.key(0), (28, 28, 1))
    opt = main_job.pruning_optimizer("deep_compression", cfg, params)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(5):
        _, state = opt.update(grads, state, params)
        params = fisher_optax.apply_mask(params, state.mask)
    rep = {p: leaf.sparsity for p, leaf in fisher_optax.sparsity_report(state.mask).leaves.items()}
    for layer, rate in main_job.HAN_RATES["mlp"].items():
        assert rep[f"['{layer}']['kernel']"] == pytest.approx(rate, abs=2e-3)


def test_best_within_one_point_of_its_seed():
    run = {
        "dense": {"accuracy": 90.0},
        "methods": {
            "m": {
                "quantized": [
                    {"accuracy": 89.5, "ratio": 20.0},
                    {"accuracy": 88.9, "ratio": 60.0},
                    {"accuracy": 89.0, "ratio": 40.0},
                ]
            }
        },
    }
    assert main_report.best_within(run, "m")["ratio"] == 40.0
    run["methods"]["m"]["quantized"] = [{"accuracy": 80.0, "ratio": 90.0}]
    assert main_report.best_within(run, "m") is None


def test_unknown_model_is_refused():
    with pytest.raises(SystemExit, match="unknown model 'vgg'"):
        main_job.main(["--models", "vgg", "--quick"])


def test_reading_compares_with_deep_compression_seed_by_seed():
    s = {
        "dense": [90.0, 90.0, 90.0],
        "methods": {
            "saliency": {"ratios": [100.0, 110.0, 90.0], "n_found": 3},
            "deep_compression": {"ratios": [90.0, 70.0, 95.0], "n_found": 3},
        },
    }
    lines = main_report.reading("net", s)
    assert "Largest ratio within 1 point: OBD saliency F w²/2, 100.0 ± 10.0x." in lines
    (dc,) = [x for x in lines if x.startswith("Against the Deep Compression")]
    assert dc.endswith("ahead on 2 of 3 (+10.0x, +40.0x, -5.0x).")
    assert "+15.0x, within seed noise" in dc
