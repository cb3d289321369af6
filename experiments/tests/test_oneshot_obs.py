"""CI smoke test of experiments/oneshot_obs.py: the whole experiment at its tiny size."""

import json

from experiments import oneshot_obs


def test_smoke_writes_json_and_page(tmp_path):
    page = tmp_path / "oneshot-obs.md"
    argv = ["--smoke", "--out", str(tmp_path), "--write-docs", "--docs-page", str(page)]
    record = oneshot_obs.main(argv)

    saved = json.loads((tmp_path / "oneshot-obs-digits.json").read_text())
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
    text = page.read_text()
    assert "python -m experiments.oneshot_obs --smoke" in text
    assert "| 90% |" in text and record["runs"][0]["dense"] > 0.5
