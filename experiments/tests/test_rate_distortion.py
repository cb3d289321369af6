"""CI smoke test of experiments/rate_distortion.py: the whole experiment at its tiny size."""

import json

from experiments import rate_distortion


def test_smoke_writes_json_and_page(tmp_path):
    page = tmp_path / "rate-distortion.md"
    argv = ["--smoke", "--out", str(tmp_path), "--write-docs", "--docs-page", str(page)]
    record = rate_distortion.main(argv)

    saved = json.loads((tmp_path / "rate-distortion-digits.json").read_text())
    assert saved["config"]["uniform_bits"] == list(rate_distortion.SMOKE.uniform_bits)
    (run,) = saved["runs"]
    points = {m: [p for p in run["points"] if p["method"] == m] for m in rate_distortion.METHODS}
    assert [len(points[m]) for m in ("kmeans", "uniform")] == [1, 1]
    sizes = sorted({points["kmeans"][0]["bytes"], points["uniform"][0]["bytes"]})
    for method in ("ecsq-fisher", "ecsq"):
        # One ECSQ file per target: the baselines' sizes and a fraction of the smallest,
        # each met from below.
        targets = [p["setting"] for p in points[method]]
        assert targets == sorted({*sizes, round(0.8 * sizes[0])})
        assert all(p["bytes"] <= p["setting"] for p in points[method])
    for p in run["points"]:
        assert sum(p["split"].values()) < p["bytes"]  # the rest: header and leaf headers
        assert 0.0 <= p["accuracy"] <= 100.0
    # The model was cached: a second run reads it and gives the same points.
    again = rate_distortion.main(argv)
    assert again["runs"][0]["points"][0]["accuracy"] == run["points"][0]["accuracy"]
    assert again["runs"][0]["train_seconds"] == run["train_seconds"]
    text = page.read_text()
    assert "python -m experiments.rate_distortion --smoke" in text
    assert "| ecsq-fisher |" in text and record["runs"][0]["dense_accuracy"] > 50
