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
    for method in rate_distortion.TARGETED:
        # One ECSQ (or Fisher-step) file per target: the baselines' sizes and a fraction of
        # the smallest, each met from below.
        targets = [p["setting"] for p in points[method]]
        assert targets == sorted({*sizes, round(0.8 * sizes[0])})
        assert all(p["bytes"] <= p["setting"] and p["lam"] > 0 for p in points[method])
    # Rate-aware fine-tuning and its control at the smallest ECSQ-Fisher targets, met from below;
    # the reported mu is the candidate with the best held-out accuracy.
    targets = [p["setting"] for p in points["ecsq-fisher"]][: rate_distortion.SMOKE.rate_at]
    for method in ("ecsq-fisher-ft", "ecsq-fisher-rate"):
        assert [p["setting"] for p in points[method]] == targets
        assert all(p["bytes"] <= p["setting"] for p in points[method])
    candidates = run["rate_candidates"]
    assert sorted({p["mu"] for p in candidates}) == list(rate_distortion.SMOKE.rate_mu)
    for p in points["ecsq-fisher-rate"]:
        held_out = [c["held_out_accuracy"] for c in candidates if c["setting"] == p["setting"]]
        assert p["held_out_accuracy"] == max(held_out) and p in candidates
    assert all(p["mu"] == 0.0 for p in points["ecsq-fisher-ft"])
    for p in run["points"]:
        assert sum(p["split"].values()) < p["bytes"]  # the rest: header and leaf headers
        assert 0.0 <= p["accuracy"] <= 100.0
    # The trained model was cached under the code version: read back, it is the same.
    cache = rate_distortion.Cache(str(tmp_path / "cache"))
    data = rate_distortion.load(rate_distortion.SMOKE)
    again = rate_distortion.train(rate_distortion.SMOKE, data, 0, cache)
    assert again["train_seconds"] == run["train_seconds"]
    model = rate_distortion.models.MLP(hidden=rate_distortion.SMOKE.hidden)
    point = rate_distortion.measure("uniform", 4, again, data, model)
    assert point["accuracy"] == points["uniform"][0]["accuracy"]
    text = page.read_text()
    assert "python -m experiments.rate_distortion --smoke" in text
    assert "| ecsq-fisher |" in text and record["runs"][0]["dense_accuracy"] > 50
    assert "| ecsq-fisher-rate |" in text and "rate-aware against plain fine-tuning" in text
    assert "| fisher-step |" in text and "(`fisher-step` minus `step`, same target)" in text
    # --no-rate-tuning: no fine-tuned points, and the page says they are not in the run.
    args = rate_distortion.build_parser().parse_args(["--smoke", "--no-rate-tuning"])
    assert rate_distortion.config(args).rate_at == 0
    rate_free = {m: m not in ("ecsq-fisher-ft", "ecsq-fisher-rate") for m in points}
    run["points"] = [p for p in run["points"] if rate_free[p["method"]]]
    run["rate_candidates"] = []
    text = rate_distortion.page(saved)
    assert "not in this run (`--no-rate-tuning`)" in text and "Rate-aware fine" not in text
    assert "| fisher-step |" in text and "| ecsq-fisher-rate |" not in text
