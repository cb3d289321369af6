"""Sparsity schedules: optax-style callables from the step count to the target sparsity.

Like ``optax.Schedule``, each schedule is a pure function of the step count that works on
Python ints and on traced int32 counts inside ``jit``, and returns a float32 scalar.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["constant_sparsity", "polynomial_sparsity"]

SparsitySchedule = Callable[[jax.typing.ArrayLike], jax.Array]
"""A function from the step count to the target sparsity in ``[0, 1]``."""


def _check_fraction(value: float, name: str, fn: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{fn}: {name} must lie in [0, 1], got {value}.")
    return value


def _check_step(value: int, name: str, fn: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative int, got {value!r}.")
    return int(value)


def polynomial_sparsity(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    power: float = 3,
) -> SparsitySchedule:
    r"""Gradual pruning: sparsity rises polynomially from ``initial`` to ``final`` (Zhu & Gupta).

    .. math::
      s_t = \begin{cases}
        0 & t < t_0 \\
        s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_1 - t_0}\right)^{p} & t_0 \le t < t_1 \\
        s_f & t \ge t_1
      \end{cases}

    with :math:`t_0` = ``begin_step``, :math:`t_1` = ``end_step``, :math:`p` = ``power``.
    Pruning fast at first and slowly at the end lets the network recover from the last,
    most damaging steps. Before ``begin_step`` nothing is pruned (sparsity 0, as in
    TF-MOT's ``PolynomialDecay``); at ``begin_step`` the sparsity jumps to
    ``initial_sparsity``.

    Args:
      final_sparsity: :math:`s_f`, the sparsity from ``end_step`` on, in ``[0, 1]``.
      begin_step: :math:`t_0`, the first pruning step.
      end_step: :math:`t_1 > t_0`, the step at which ``final_sparsity`` is reached.
      initial_sparsity: :math:`s_i`, the sparsity at ``begin_step``, in ``[0, 1]``.
      power: :math:`p > 0`; 3 in the paper.

    Returns:
      A schedule: ``schedule(step) -> float32 scalar``, usable under ``jit``.

    Raises:
      ValueError: if a sparsity lies outside ``[0, 1]``, a step is negative or not an int,
        ``end_step <= begin_step``, or ``power <= 0``.

    Examples:
      >>> import fisher_optax
      >>> schedule = fisher_optax.polynomial_sparsity(0.9, begin_step=100, end_step=200)
      >>> [round(float(schedule(t)), 4) for t in (0, 100, 150, 200, 1000)]
      [0.0, 0.0, 0.7875, 0.9, 0.9]

    References:
      Zhu, Gupta. To prune, or not to prune: exploring the efficacy of pruning for model
      compression. 2017. https://arxiv.org/abs/1710.01878
    """
    fn = "polynomial_sparsity"
    final_sparsity = _check_fraction(final_sparsity, "final_sparsity", fn)
    initial_sparsity = _check_fraction(initial_sparsity, "initial_sparsity", fn)
    begin_step = _check_step(begin_step, "begin_step", fn)
    end_step = _check_step(end_step, "end_step", fn)
    if end_step <= begin_step:
        raise ValueError(
            f"{fn}: end_step ({end_step}) must exceed begin_step ({begin_step}); for one-shot "
            "pruning use constant_sparsity(sparsity, step)."
        )
    if not float(power) > 0:
        raise ValueError(f"{fn}: power must be positive, got {power}.")

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((step - begin_step) / (end_step - begin_step), 0.0, 1.0)
        s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** power
        return jnp.where(step < begin_step, 0.0, s).astype(jnp.float32)

    return schedule


def constant_sparsity(sparsity: float, step: int = 0) -> SparsitySchedule:
    """One-shot pruning: sparsity 0 before ``step``, ``sparsity`` from ``step`` on.

    Args:
      sparsity: the target sparsity, in ``[0, 1]``.
      step: the step at which to prune (0: from the first update).

    Returns:
      A schedule: ``schedule(step) -> float32 scalar``, usable under ``jit``.

    Raises:
      ValueError: if ``sparsity`` lies outside ``[0, 1]`` or ``step`` is not a
        non-negative int.

    Examples:
      >>> import fisher_optax
      >>> schedule = fisher_optax.constant_sparsity(0.8, step=10)
      >>> float(schedule(9)), round(float(schedule(10)), 4)
      (0.0, 0.8)
    """
    fn = "constant_sparsity"
    sparsity = _check_fraction(sparsity, "sparsity", fn)
    step0 = _check_step(step, "step", fn)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        return jnp.where(jnp.asarray(count) >= step0, sparsity, 0.0).astype(jnp.float32)

    return schedule
