"""rate_penalty: value and gradient against a NumPy loop (per leaf and per slice, with
Fisher and pruned weights), jit without recompiles, inputs untouched, and every error by
its message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisher_optax import (
    QuantizedParams,
    dequantize,
    load_compressed,
    quantize,
    quantize_to_target,
    rate_penalty,
    requantize,
    save_compressed,
)


def _case(seed=0, axis=None, prune_zero=False):
    """A pruned kernel, a second kernel, a raw bias; an ECSQ q of them with a few codes;
    and fine-tuned weights: q's source plus noise, so the cheapest codes differ from q's."""
    rng = np.random.default_rng(seed)
    params = {
        "a": {"kernel": (rng.laplace(size=(9, 4)) * 0.3).astype(np.float32)},
        "b": {
            "bias": rng.normal(size=(3,)).astype(np.float32),
            "kernel": (rng.normal(size=(4, 3)) * 0.5).astype(np.float32),
        },
    }
    fisher = jax.tree.map(lambda x: rng.uniform(0.2, 3.0, size=x.shape).astype(np.float32), params)
    mask = jax.tree.map(lambda x: np.abs(x) > 0.05, params)
    q = quantize(
        params, 4, fisher=fisher, mask=mask, method="ecsq", lam=0.002, axis=axis,
        prune_zero=prune_zero,
    )  # fmt: skip
    moved = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.2, params)
    return params, fisher, q, moved


def _priced(q, lam):
    """``q`` with another price of a bit."""
    return QuantizedParams(
        q.bits, q.codes, q.codebooks, q.raw, treedef=q.treedef, dtypes=q.dtypes, axes=q.axes,
        lam=lam,
    )  # fmt: skip


def _reference(params, q, fisher=None):
    """The penalty and its gradient, weight by weight (float64)."""
    leaves = jax.tree.leaves(params)
    fish = [None] * len(leaves) if fisher is None else jax.tree.leaves(fisher)
    total, grads = 0.0, []
    for i, x in enumerate(leaves):
        x = np.asarray(x, np.float64)
        g = np.zeros(x.shape)
        grads.append(g)
        if not q.quantized[i]:
            continue
        f = np.ones(x.shape) if fish[i] is None else np.asarray(fish[i], np.float64)
        bits, codes, axis = np.asarray(q.bits[i]), np.asarray(q.codes[i]), q.axes[i]
        for b, book in q.codebooks[i].items():
            book = np.asarray(book, np.float64)
            sel = bits == b
            n = sel.sum()
            counts = np.bincount(codes[sel], minlength=book.shape[-1])
            for idx in zip(*np.nonzero(sel), strict=True):
                if axis is None:
                    row, size = book, book.size
                else:
                    c = idx[axis]
                    in_slice = sel & (np.indices(x.shape)[axis] == c)
                    row, size = book[c], codes[in_slice].max() + 1
                best = None
                for k in range(size):
                    if counts[k] == 0:
                        continue
                    cost = f[idx] * (x[idx] - row[k]) ** 2 + q.lam * np.log2(n / counts[k])
                    if best is None or cost < best[0]:
                        best = (cost, row[k])
                total += best[0]
                g[idx] = 2 * f[idx] * (x[idx] - best[1])
    return total, jax.tree.unflatten(jax.tree.structure(params), grads)


@pytest.mark.parametrize(
    ("axis", "prune_zero", "with_fisher"),
    [(None, False, True), (None, True, False), (-1, False, True), (0, True, True)],
)
def test_value_and_gradient_match_a_numpy_loop(axis, prune_zero, with_fisher):
    params, fisher, q, moved = _case(1, axis=axis, prune_zero=prune_zero)
    fisher = fisher if with_fisher else None
    assert any(len(b) and np.size(next(iter(b.values()))) > 2 for b in q.codebooks)
    # At 25x q's lam the rate, not the distance, picks many weights' codes.
    dear = _priced(q, 25 * q.lam)
    for p, qq in ((params, q), (moved, q), (moved, dear)):
        value, grad = jax.value_and_grad(rate_penalty)(p, qq, fisher=fisher)
        want, want_grad = _reference(p, qq, fisher)
        assert float(value) == pytest.approx(want, rel=1e-5)
        for got, ref in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # The bias is raw and the weights q does not code get no gradient.
    _, grad = jax.value_and_grad(rate_penalty)(moved, q, fisher=fisher)
    assert not np.asarray(grad["b"]["bias"]).any()
    for i, k in ((0, "a"), (2, "b")):  # flattening order: a.kernel, b.bias, b.kernel
        uncoded = np.asarray(q.bits[i]) == 0
        assert uncoded.any() or k == "b"
        assert not np.asarray(grad[k]["kernel"])[uncoded].any()


def test_at_the_source_weights_it_is_the_ecsq_objective():
    # Without per-slice books, q's own codes are the cheapest (ECSQ Lloyd's fixed point):
    # the penalty is q's distortion plus lam times the order-0 bits of its codes.
    params, fisher, q, _ = _case(2)
    deq = jax.tree.leaves(jax.tree.map(np.asarray, dequantize(q)))
    want = 0.0
    for i, (x, f, d) in enumerate(
        zip(jax.tree.leaves(params), jax.tree.leaves(fisher), deq, strict=True)
    ):
        if not q.quantized[i]:
            continue
        coded = np.asarray(q.bits[i]) > 0
        codes = np.asarray(q.codes[i])[coded]
        _, counts = np.unique(codes, return_counts=True)
        bits = np.sum(counts * np.log2(codes.size / counts))
        want += np.sum((f * (x - d) ** 2)[coded]) + q.lam * bits
    assert float(rate_penalty(params, q, fisher=fisher)) == pytest.approx(want, rel=1e-5)


def test_the_rate_pulls_a_weight_to_a_common_code_over_a_rare_nearer_one():
    w = {"w": jnp.array([[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0]])}
    q = quantize(w, 8, method="ecsq", lam=1e-3)
    np.testing.assert_array_equal(q.codebooks[0][8], [-1.0, 1.0])
    # At 0.1 the nearer entry is 1.0 (1 of 7 codes, 2.81 bits), the common -1.0 costs
    # 0.22 bits: with lam = 1 the cheaper code is -1.0, and the gradient points there.
    moved = {"w": w["w"].at[0, 6].set(0.1)}
    for lam, code in ((1.0, -1.0), (1e-3, 1.0)):
        grad = jax.grad(rate_penalty)(moved, _priced(q, lam))["w"]
        assert float(grad[0, 6]) == pytest.approx(2 * (0.1 - code))


def test_jit_with_q_closed_over_or_passed_and_no_recompile():
    params, fisher, q, moved = _case(3, axis=-1)
    want = float(rate_penalty(moved, q, fisher=fisher))
    closed = jax.jit(lambda p: rate_penalty(p, q, fisher=fisher))
    assert float(closed(moved)) == pytest.approx(want, rel=1e-6)
    passed = jax.jit(rate_penalty)
    assert float(passed(moved, q, fisher=fisher)) == pytest.approx(want, rel=1e-6)
    step = jax.jit(jax.grad(lambda p: rate_penalty(p, q, fisher=fisher)))
    step(params)
    step(moved)
    assert step._cache_size() == 1


def test_inputs_are_not_modified():
    _, fisher, q, moved = _case(4, prune_zero=True)
    copies = [jax.tree.map(np.array, t) for t in (moved, fisher)]
    books = [{b: np.array(c) for b, c in d.items()} for d in q.codebooks]
    codes = [None if c is None else np.array(c) for c in q.codes]
    jax.grad(rate_penalty)(moved, q, fisher=fisher)
    for t, c in zip((moved, fisher), copies, strict=True):
        for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(c), strict=True):
            np.testing.assert_array_equal(a, b)
    for d, e in zip(q.codebooks, books, strict=True):
        for b in d:
            np.testing.assert_array_equal(d[b], e[b])
    for c, e in zip(q.codes, codes, strict=True):
        if c is not None:
            np.testing.assert_array_equal(c, e)


def test_lam_is_recorded_by_ecsq_and_kept_by_requantize(tmp_path):
    params, fisher, q, _ = _case(5)
    assert q.lam == 0.002
    q_t, lam = quantize_to_target(params, size_bytes=200, fisher=fisher)
    assert q_t.lam == lam
    assert requantize(dequantize(q), q).lam == 0.002
    assert quantize(params, 2).lam is None
    save_compressed(tmp_path / "q.foqz", q)
    assert load_compressed(tmp_path / "q.foqz").lam is None


def test_errors_say_what_to_pass(tmp_path):
    params, fisher, q, _ = _case(6)
    with pytest.raises(ValueError, match="method='ecsq' or 'fisher_step', or quantize_to_target"):
        rate_penalty(params, quantize(params, 2))
    save_compressed(tmp_path / "q.foqz", q)
    with pytest.raises(ValueError, match="records none"):
        rate_penalty(params, load_compressed(tmp_path / "q.foqz"))
    with pytest.raises(TypeError, match="q must be the QuantizedParams returned by quantize"):
        rate_penalty(params, params)
    with pytest.raises(ValueError, match=r"params has no leaf at \['b'\]"):
        rate_penalty({"a": params["a"]}, q)
    with pytest.raises(ValueError, match=r"params at \['a'\]\['kernel'\] has shape \(4, 9\)"):
        rate_penalty({**params, "a": {"kernel": params["a"]["kernel"].T}}, q)
    with pytest.raises(
        ValueError,
        match=r"fisher does not match the structure of q: leaf 1 is at \['b'\]\['kernel'\]",
    ):
        rate_penalty(params, q, fisher={**fisher, "b": {"kernel": fisher["b"]["kernel"]}})
    negative = {**fisher, "a": {"kernel": -fisher["a"]["kernel"]}}
    with pytest.raises(ValueError, match=r"fisher at \['a'\]\['kernel'\] holds \d+ negative"):
        rate_penalty(params, q, fisher=negative)
    as_int = {**params, "a": {"kernel": np.ones((9, 4), np.int32)}}
    with pytest.raises(TypeError, match=r"params at \['a'\]\['kernel'\] has dtype int32"):
        rate_penalty(as_int, q)
