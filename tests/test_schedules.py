"""Sparsity schedules against the closed-form formula, under jit, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fisher_optax as fo


def zhu_gupta(t, s_f, t0, t1, s_i, power):
    """Zhu & Gupta (2017), eq. 1, written out in Python floats; 0 before t0."""
    if t < t0:
        return 0.0
    if t >= t1:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t1 - t0)) ** power


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.floats(0, 1),
    st.floats(0, 1),
    st.integers(0, 50),
    st.integers(1, 100),
    st.sampled_from([1, 2, 3]),
    st.integers(0, 200),
)
def test_polynomial_matches_formula(s_f, s_i, t0, span, power, t):
    schedule = fo.polynomial_sparsity(s_f, t0, t0 + span, initial_sparsity=s_i, power=power)
    want = zhu_gupta(t, s_f, t0, t0 + span, s_i, power)
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5, atol=1e-6)


def test_polynomial_is_monotone_and_jittable():
    schedule = fo.polynomial_sparsity(0.9, begin_step=10, end_step=110)
    values = jax.jit(jax.vmap(schedule))(jnp.arange(200, dtype=jnp.int32))
    assert values.dtype == jnp.float32
    assert float(values[9]) == 0.0 and float(values[10]) == 0.0
    assert np.all(np.diff(np.asarray(values)) >= 0)
    np.testing.assert_allclose(values[110:], 0.9)


def test_constant_sparsity_steps_once():
    schedule = fo.constant_sparsity(0.7, step=5)
    values = [float(schedule(t)) for t in range(8)]
    np.testing.assert_allclose(values, [0.0] * 5 + [0.7] * 3, rtol=1e-6)
    assert float(jax.jit(schedule)(jnp.int32(100))) == pytest.approx(0.7)
    assert float(fo.constant_sparsity(0.3)(0)) == pytest.approx(0.3)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"final_sparsity must be a finite number in \[0.0, 1.0\]"):
        fo.polynomial_sparsity(1.2, 0, 10)
    with pytest.raises(ValueError, match=r"final_sparsity must be a finite number.*got nan"):
        fo.polynomial_sparsity(float("nan"), 0, 10)
    with pytest.raises(ValueError, match=r"initial_sparsity must be a finite number in \[0.0"):
        fo.polynomial_sparsity(0.5, 0, 10, initial_sparsity=-0.5)
    with pytest.raises(ValueError, match=r"end_step \(5\) must exceed begin_step \(5\)"):
        fo.polynomial_sparsity(0.5, 5, 5)
    with pytest.raises(ValueError, match="begin_step must be an int >= 0, got -1"):
        fo.polynomial_sparsity(0.5, -1, 5)
    with pytest.raises(TypeError, match="end_step must be an int >= 0, got True"):
        fo.polynomial_sparsity(0.5, 0, True)
    with pytest.raises(ValueError, match=r"power must be a finite number > 0.0, got 0"):
        fo.polynomial_sparsity(0.5, 0, 5, power=0)
    with pytest.raises(ValueError, match=r"sparsity must be a finite number in \[0.0, 1.0\].*2.0"):
        fo.constant_sparsity(2.0)
    with pytest.raises(TypeError, match=r"step must be an int >= 0, got 1\.5"):
        fo.constant_sparsity(0.5, 1.5)


def test_schedules_are_plain_callables():
    """A schedule carries no attributes for pruned to read: pruned(end_step=) says where to
    check it (tests/test_transforms.py)."""
    for schedule in (fo.polynomial_sparsity(0.5, 3, 9), fo.constant_sparsity(0.5, 4)):
        assert not hasattr(schedule, "end_step")
        assert float(schedule(9)) == pytest.approx(0.5)


def test_polynomial_sparsity_is_exact_past_2_to_the_24_steps():
    """Steps are subtracted as integers: in float32 they were rounded to even numbers above
    2**24 (sparsities in a staircase; the step before an odd begin_step pruned already)."""
    begin, end = 20_000_001, 20_000_011
    schedule = fo.polynomial_sparsity(0.9, begin_step=begin, end_step=end, power=1)
    got = [float(schedule(jnp.int32(t))) for t in range(begin - 1, end + 1)]
    want = [0.0] + [0.9 * (t - begin) / 10 for t in range(begin, end + 1)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    jitted = jax.jit(schedule)
    np.testing.assert_allclose([float(jitted(jnp.int32(t))) for t in (begin - 1, begin + 3)],
                               [0.0, 0.27], atol=1e-6)  # fmt: skip
