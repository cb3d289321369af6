"""quantize(method="fisher_step") and quantize_to_target(method="fisher_step") against a
NumPy loop: a grid through 0 per leaf (or slice) with step sqrt(6 lam / (ln 2 mean F))."""

import copy

import jax
import numpy as np
import pytest

from fisher_optax import (
    compression_report,
    dequantize,
    load_compressed,
    quantize,
    quantize_to_target,
    save_compressed,
)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "a": {"kernel": (rng.laplace(size=(30, 6)) * 0.1).astype(np.float32)},
        "b": {"kernel": (rng.laplace(size=(20, 4)) * 0.1).astype(np.float32)},
        "b_bias": np.ones(4, np.float32),
    }
    fisher = {
        "a": {"kernel": rng.exponential(size=(30, 6)).astype(np.float32)},
        "b": {"kernel": 50 * rng.exponential(size=(20, 4)).astype(np.float32)},
        "b_bias": np.ones(4, np.float32),
    }
    mask = jax.tree.map(lambda x: np.abs(x) > 0.02, params)
    return params, fisher, mask


def _reference(w, f, kept, lam, bits, axis):
    """round(w / step) * step per leaf (or per slice along ``axis``), in a loop."""
    w, f = np.asarray(w, np.float64), np.asarray(f, np.float64)
    out, steps = np.zeros_like(w), []
    slices = [(slice(None),) * w.ndim] if axis is None else [
        (slice(None),) * (axis % w.ndim) + (c,) for c in range(w.shape[axis])
    ]  # fmt: skip
    for s in slices:
        ws, fs, ks = w[s], f[s], kept[s]
        step = np.sqrt(6 * lam / (np.log(2) * fs[ks].mean()))
        step = max(step, (ws[ks].max() - ws[ks].min()) / (2**bits - 2.5))
        out[s] = np.where(ks, np.round(ws / step) * step, 0.0)
        steps.append(step)
    return out, steps


@pytest.mark.parametrize("axis", [None, -1])
def test_fisher_step_matches_a_numpy_loop(axis):
    params, fisher, mask = _problem()
    before = copy.deepcopy((params, fisher, mask))
    q = quantize(params, 8, fisher=fisher, mask=mask, method="fisher_step", lam=1e-4, axis=axis)
    out = dequantize(q)
    assert q.lam == 1e-4 and q.quantized == (True, True, False)  # the bias stays raw
    for i, k in ((0, "a"), (1, "b")):
        m = mask[k]["kernel"]
        want, _ = _reference(params[k]["kernel"], fisher[k]["kernel"], m, 1e-4, 8, axis)
        np.testing.assert_allclose(out[k]["kernel"], want, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(np.asarray(q.bits[i]) > 0, m)  # pruned stays pruned
        book = q.codebooks[i][8]
        rows = book[None] if axis is None else book
        codes = np.asarray(q.codes[i])
        for c, row in enumerate(rows):  # ascending, every entry some kept weight's
            held = codes[m] if axis is None else codes[:, c][m[:, c]]
            used = row[: held.max() + 1]
            assert np.all(np.diff(used) > 0) and set(held) == set(range(used.size))
    np.testing.assert_array_equal(out["b_bias"], params["b_bias"])
    jax.tree.map(np.testing.assert_array_equal, (params, fisher, mask), before)


def test_fisher_step_steps_scale_as_one_over_root_mean_fisher():
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(50, 8)) * 0.1).astype(np.float32)
    f = rng.exponential(size=(50, 8)).astype(np.float32)
    params = {"a": w, "b": w}
    fisher = {"a": f, "b": 4 * f[::-1]}  # the same values: 4x the mean Fisher
    q = quantize(params, 8, fisher=fisher, method="fisher_step", lam=1e-4)
    steps = [np.diff(q.codebooks[i][8]).min() for i in range(2)]
    want = np.sqrt(6e-4 / (np.log(2) * f.astype(np.float64).mean()))
    assert steps[0] == pytest.approx(want, rel=1e-6)
    assert steps[0] / steps[1] == pytest.approx(2.0, rel=1e-6)
    # Without a Fisher every leaf has mean Fisher 1: one step everywhere.
    plain = quantize(params, 8, method="fisher_step", lam=1e-4)
    ones = quantize(params, 8, fisher=jax.tree.map(np.ones_like, params), method="fisher_step",
                    lam=1e-4)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, dequantize(plain), dequantize(ones))
    assert np.diff(plain.codebooks[0][8]).min() == pytest.approx(np.sqrt(6e-4 / np.log(2)))


def test_fisher_step_prune_zero_and_the_file(tmp_path):
    params, fisher, mask = _problem()
    for axis in (None, -1):
        kw = dict(fisher=fisher, mask=mask, method="fisher_step", lam=3e-3, axis=axis)
        kept = quantize(params, 6, **kw)
        pruned = quantize(params, 6, prune_zero=True, **kw)
        a, m = dequantize(kept)["a"]["kernel"], mask["a"]["kernel"]
        zero = m & (a == 0)
        assert zero.any() and np.all(np.asarray(kept.bits[0])[zero] == 6)  # a kept zero
        bits = np.asarray(pruned.bits[0])
        np.testing.assert_array_equal(bits > 0, m & (a != 0))  # pruned at 0 instead
        jax.tree.map(np.testing.assert_array_equal, dequantize(pruned), dequantize(kept))
        assert compression_report(pruned).total_bytes < compression_report(kept).total_bytes
        path = tmp_path / f"q{axis}.foqz"
        save_compressed(path, pruned)
        back = dequantize(load_compressed(path))
        jax.tree.map(np.testing.assert_array_equal, back, dequantize(pruned))


@pytest.mark.parametrize("axis", [None, -1])
def test_fisher_step_never_needs_more_than_2_to_the_bits_entries(axis):
    params, fisher, mask = _problem(2)
    q = quantize(params, 2, fisher=fisher, mask=mask, method="fisher_step", lam=1e-12, axis=axis)
    out = dequantize(q)
    for i, k in ((0, "a"), (1, "b")):
        assert np.asarray(q.codebooks[i][2]).shape[-1] <= 4
        m = mask[k]["kernel"]
        want, steps = _reference(params[k]["kernel"], fisher[k]["kernel"], m, 1e-12, 2, axis)
        np.testing.assert_allclose(out[k]["kernel"], want, rtol=1e-6, atol=0)
        assert np.all(np.asarray(steps) > 1e-5)  # the range's step, not lam's


def test_fisher_step_zero_fisher_rounds_a_leaf_to_zero(recwarn):
    params = {"a": np.arange(1.0, 10.0, dtype=np.float32).reshape(3, 3)}
    zero = {"a": np.zeros((3, 3), np.float32)}
    q = quantize(params, 4, fisher=zero, method="fisher_step", lam=0.1)
    assert np.asarray(q.bits[0]).all() and not np.asarray(dequantize(q)["a"]).any()
    q = quantize(params, 4, fisher=zero, method="fisher_step", lam=0.1, prune_zero=True)
    assert not np.asarray(q.bits[0]).any() and q.widths[0] == ()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_quantize_to_target_fisher_step_meets_the_size():
    params, fisher, mask = _problem()
    q, lam = quantize_to_target(
        params, size_bytes=600, fisher=fisher, mask=mask, prune_zero=True, method="fisher_step"
    )
    size = compression_report(q).total_bytes
    assert 540 < size <= 600 and q.lam == lam
    again = quantize(params, 8, fisher=fisher, mask=mask, method="fisher_step", lam=lam,
                     prune_zero=True)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, dequantize(again), dequantize(q))


def test_fisher_step_errors_leave_the_inputs_untouched(monkeypatch):
    params, fisher, mask = _problem()
    before = copy.deepcopy((params, fisher, mask))
    kw = dict(fisher=fisher, mask=mask, method="fisher_step")
    with pytest.raises(ValueError, match=r"method='fisher_step' sets each leaf's step .* lam > 0"):
        quantize(params, 8, **kw)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        quantize(params, 8, lam=-1.0, **kw)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        quantize(params, 8, lam=float("nan"), **kw)
    with pytest.raises(TypeError, match="lam must be a real number"):
        quantize(params, 8, lam="1e-3", **kw)
    with pytest.raises(ValueError, match="needs bits >= 2, got bits=1"):
        quantize(params, 1, lam=1e-3, **kw)
    with pytest.raises(ValueError, match=r"must be an int in 1\.\.16, got 17"):
        quantize(params, 17, lam=1e-3, **kw)
    bits = jax.tree.map(lambda x: np.full(x.shape, 4), params)
    with pytest.raises(ValueError, match="'fisher_step' chooses each weight's code length"):
        quantize(params, bits, lam=1e-3, **kw)
    with pytest.raises(ValueError, match="read by method='ecsq' and 'fisher_step' only"):
        quantize(params, 8, method="uniform", lam=1e-3)
    negative = jax.tree.map(lambda f: -f, fisher)
    with pytest.raises(ValueError, match=r"fisher at \['a'\]\['kernel'\] holds .* negative"):
        quantize(params, 8, fisher=negative, mask=mask, method="fisher_step", lam=1e-3)
    with pytest.raises(ValueError, match="quantize_to_target's method must be one of"):
        quantize_to_target(params, size_bytes=600, method="kmeans")
    with pytest.raises(ValueError, match="no lam gives size_bytes <= 10"):
        quantize_to_target(params, size_bytes=10, method="fisher_step")
    monkeypatch.setattr("fisher_optax._validate.spans_processes", lambda x: True)
    with pytest.raises(
        ValueError, match=r"quantize\(method='fisher_step'\) on arrays that span processes"
    ):
        quantize(params, 8, lam=1e-3, **kw)
    monkeypatch.undo()
    jax.tree.map(np.testing.assert_array_equal, (params, fisher, mask), before)
