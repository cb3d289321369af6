"""CI smoke test of experiments/oneshot_obs.py: the whole experiment at its tiny size."""

import json

from experiments import oneshot_obs

PAGE = """# t
<!-- results:oneshot-obs:mlp-40-20:begin -->
OLD-SECTION-TEXT
<!-- results:oneshot-obs:mlp-40-20:end -->
tail
"""


def test_smoke_writes_json_and_its_section_of_the_page(tmp_path):
    page = tmp_path / "oneshot-obs.md"
    page.write_text(PAGE)
    argv = ["--smoke", "--out", str(tmp_path), "--write-docs", "--docs-page", str(page)]
    record = oneshot_obs.main(argv)

    saved = json.loads((tmp_path / "oneshot-obs-digits-mlp-40-20.json").read_text())
    assert saved["config"]["sparsities"] == list(oneshot_obs.SMOKE.sparsities)
    (run,) = saved["runs"]
    assert [row["sparsity"] for row in run["rows"]] == list(oneshot_obs.SMOKE.sparsities)
    n_kernel = 64 * 40 + 40 * 20 + 20 * 10
    for row in run["rows"]:
        assert row["obs_damping"] in oneshot_obs.SMOKE.dampings
        assert row["kept"] == 3630 - round(row["sparsity"] * n_kernel)  # biases kept
        assert all(0.0 <= row[m] <= 1.0 for m in oneshot_obs.METHODS)
    # the inverse holds ceil(n / B) * B^2 floats per leaf
    b = oneshot_obs.SMOKE.block_size
    sizes = [64 * 40, 40, 40 * 20, 20, 20 * 10, 10]
    assert run["floats"]["finv"] == sum(-(-n // b) * b * b for n in sizes)
    assert set(run["seconds"]) >= {"epoch", "inverse", "fisher_vmap", "fisher_layers"}
    text = page.read_text()
    assert "OLD-SECTION-TEXT" not in text and text.endswith("tail\n")
    assert "python -m experiments.oneshot_obs --smoke" in text
    assert "### MLP 64-40-20-10 (mlp-40-20) on digits" in text
    assert "| 90% |" in text and record["runs"][0]["dense"] > 0.5


def test_presets_size_lenet_300_100_and_flags_override_them():
    args = oneshot_obs.build_parser().parse_args(["--model", "lenet-300-100"])
    cfg = oneshot_obs.make_config(args)
    assert (cfg.model, cfg.block_size, cfg.n_grads) == ("lenet-300-100", 32, 500)
    args = oneshot_obs.build_parser().parse_args(["--model", "lenet-300-100", "--n-grads", "64"])
    assert oneshot_obs.make_config(args).n_grads == 64
    assert oneshot_obs.make_config(oneshot_obs.build_parser().parse_args([])).block_size == 64
