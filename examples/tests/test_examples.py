"""Smoke runs of the examples, each as a user runs it: a script next to its helper modules."""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_resnet_surgery_quick():
    """The cut equals the masked model, and shrinks."""
    code = (
        "import json, resnet_surgery; print('RESULT', json.dumps(resnet_surgery.main(['--quick'])))"
    )
    out = json.loads(run(code).split("RESULT ", 1)[1])
    assert out["removed"] == out["total"] // 2
    assert out["max_diff"] < 1e-4
    assert out["acc_small"] == out["acc_masked"]
    assert out["params"][1] < out["params"][0] and out["flops"][1] < out["flops"][0]


def test_nnx_cnn_quick():
    """Trained with pruned(adam) under nnx.jit, cut by group saliency: the cut model computes
    the masked model's logits and has fewer parameters."""
    out = run("import sys, nnx_cnn; sys.argv = ['nnx_cnn.py', '--quick']; nnx_cnn.main()")
    diff = float(re.search(r"max \|shrunk - masked\| logit difference: (\S+)", out).group(1))
    assert diff < 1e-4
    ratio = re.search(r"\| ratio dense/shrunk \| \| ([\d.]+)x \| \| ([\d.]+)x", out)
    assert float(ratio.group(1)) > 1 and float(ratio.group(2)) > 1


def test_equinox_quickstart():
    """An Equinox model from training to a file and back; the script exits 1 when the
    model loaded back falls to 80% accuracy or below."""
    out = run("import runpy; runpy.run_path('examples/equinox_quickstart.py', run_name='__main__')")
    assert "the MLP loaded back: accuracy" in out
