"""Sparsity schedules: optax-style callables from the step count to the target sparsity.

Like ``optax.Schedule``, each schedule is a pure function of the step count that works on
Python ints and on traced int32 counts inside ``jit``, and returns a float32 scalar. A
schedule carries nothing else: :func:`fisher_optax.pruned` checks it at the steps it is
told about (``end_step=``), any plain callable alike.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fisher_optax import _validate
from fisher_optax._types import SparsitySchedule

__all__ = ["constant_sparsity", "polynomial_sparsity"]


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
      ValueError: if a sparsity lies outside ``[0, 1]`` or is NaN, a step is negative,
        ``end_step <= begin_step``, or ``power <= 0``.
      TypeError: if a step is not an int (bools included) or a sparsity not a number.

    Examples:
      >>> import fisher_optax
      >>> schedule = fisher_optax.polynomial_sparsity(0.9, begin_step=100, end_step=200)
      >>> [round(float(schedule(t)), 4) for t in (0, 100, 150, 200, 1000)]
      [0.0, 0.0, 0.7875, 0.9, 0.9]

    References:
      Zhu, Gupta. To prune, or not to prune: exploring the efficacy of pruning for model
      compression. 2017. https://arxiv.org/abs/1710.01878
    """
    final_sparsity = _validate.real(final_sparsity, "final_sparsity", low=0.0, high=1.0)
    initial_sparsity = _validate.real(initial_sparsity, "initial_sparsity", low=0.0, high=1.0)
    begin_step = _validate.integer(begin_step, "begin_step", minimum=0)
    end_step = _validate.integer(end_step, "end_step", minimum=0)
    if end_step <= begin_step:
        raise ValueError(
            f"end_step ({end_step}) must exceed begin_step ({begin_step}); for one-shot "
            "pruning use constant_sparsity(sparsity, step)."
        )
    power = _validate.real(power, "power", low=0.0, low_open=True)

    span = end_step - begin_step

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step)
        if jnp.issubdtype(step.dtype, jnp.integer):
            # Steps subtracted as integers: in float32 they would be rounded to multiples of
            # 2 above 2**24 (and of 4 above 2**25), a staircase of sparsities.
            wide = jnp.int64 if step.dtype.itemsize > 4 else jnp.int32
            top = np.iinfo(wide).max
            begin = jnp.asarray(min(begin_step, top), wide)
            done = jnp.clip(step.astype(wide) - begin, 0, min(span, top))
            frac, before = done.astype(jnp.float32) / np.float32(span), step < begin
        else:
            step = step.astype(jnp.float32)
            frac, before = jnp.clip((step - begin_step) / span, 0.0, 1.0), step < begin_step
        s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** power
        return jnp.where(before, 0.0, s).astype(jnp.float32)

    return schedule


def constant_sparsity(sparsity: float, step: int = 0) -> SparsitySchedule:
    """One-shot pruning: sparsity 0 before ``step``, ``sparsity`` from ``step`` on.

    Args:
      sparsity: the target sparsity, in ``[0, 1]``.
      step: the step at which to prune (0: from the first update).

    Returns:
      A schedule: ``schedule(step) -> float32 scalar``, usable under ``jit``.

    Raises:
      ValueError: if ``sparsity`` lies outside ``[0, 1]`` or is NaN, or ``step`` is negative.
      TypeError: if ``step`` is not an int (bools included) or ``sparsity`` not a number.

    Examples:
      >>> import fisher_optax
      >>> schedule = fisher_optax.constant_sparsity(0.8, step=10)
      >>> float(schedule(9)), round(float(schedule(10)), 4)
      (0.0, 0.8)
    """
    sparsity = _validate.real(sparsity, "sparsity", low=0.0, high=1.0)
    step0 = _validate.integer(step, "step", minimum=0)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        return jnp.where(jnp.asarray(count) >= step0, sparsity, 0.0).astype(jnp.float32)

    return schedule
