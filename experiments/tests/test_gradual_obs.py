"""CI smoke test of experiments/gradual_obs.py: the whole experiment at its tiny size."""

import json

import pytest

from experiments import gradual_obs

PAGE = """# t
<!-- results:gradual-obs:begin -->
OLD-SECTION-TEXT
<!-- results:gradual-obs:end -->
tail
"""


def test_smoke_prunes_each_criterion_to_each_level_and_writes_the_section(tmp_path):
    page = tmp_path / "oneshot-obs.md"
    page.write_text(PAGE)
    argv = ["--smoke", "--out", str(tmp_path), "--write-docs", "--docs-page", str(page)]
    gradual_obs.main(argv)

    saved = json.loads((tmp_path / "gradual-obs-digits.json").read_text())
    (run,) = saved["runs"]
    assert set(run["methods"]) == {"magnitude", "obd", "obs@0.0001"}
    for res in run["methods"].values():
        got = [lv["sparsity"] for lv in res["levels"]]
        assert got == pytest.approx(gradual_obs.SMOKE.levels, abs=1e-3)  # the kernels'
        assert all(0.0 <= lv["test"] <= 1.0 for lv in res["levels"])
    text = page.read_text()
    assert "OLD-SECTION-TEXT" not in text and text.endswith("tail\n")
    assert "python -m experiments.gradual_obs --smoke" in text and "| 80% |" in text
    assert "block OBS minus OBD (points, paired over seeds): 50%: " in text

    # --render writes the same section from the JSON alone
    again = tmp_path / "again.md"
    again.write_text(PAGE)
    json_path = str(tmp_path / "gradual-obs-digits.json")
    gradual_obs.main(["--render", json_path, "--write-docs", "--docs-page", str(again)])
    assert again.read_text() == text
