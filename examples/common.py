"""What the Flax examples share: the digits data, one training loop, a timing helper.

Imported as ``from common import ...`` by the examples in this folder when they run as
scripts (``python examples/nnx_cnn.py``: Python puts the script's folder on the path).
"""

import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

__all__ = ["Digits", "accuracy", "load_digits", "median_times", "predict", "train"]


class Digits(NamedTuple):
    """scikit-learn's 8x8 digits as arrays: float32 images in ``[0, 1]``, shape
    ``(n, 8, 8, 1)``, and int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1,797 digits (shipped inside scikit-learn), split stratified by class.

    Args:
      test_fraction: the share of each class held out for testing.
      seed: the seed of the split.

    Returns:
      A :class:`Digits`.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0).reshape(-1, 8, 8, 1)
    y = y.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, round(test_fraction * len(idx)), replace=False)] = True
    return Digits(x[~test], y[~test], x[test], y[test])


def _loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


def train(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    data: Digits,
    steps: int,
    batch: int,
    rng: np.random.Generator,
) -> float:
    """``steps`` steps of softmax cross-entropy on random batches, in training mode.

    The model is left in evaluation mode (Dropout off, BatchNorm on its running
    statistics). Returns the last batch's loss.
    """
    model.train()
    loss = float("nan")
    for _ in range(steps):
        idx = rng.choice(len(data.y_train), batch, replace=False)
        loss = float(_train_step(model, optimizer, data.x_train[idx], data.y_train[idx]))
    model.eval()
    return loss


def predict(model: nnx.Module, x: jax.Array) -> np.ndarray:
    """The model's outputs in evaluation mode, under one ``jit``; ``model`` keeps its mode."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    return np.asarray(jax.jit(forward)(state, x))


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The share of ``x`` classified as ``y``."""
    return float((predict(model, x).argmax(-1) == y).mean())


def median_times(models: Sequence[nnx.Module], x: jax.Array, repeats: int) -> list[float]:
    """Median seconds per jitted forward pass of each model; calls interleaved so that load
    drifts hit all models alike."""
    fns = []
    for m in models:
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        fn(state, x).block_until_ready()  # compile
        fns.append((fn, state))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, (fn, state) in enumerate(fns):
            t = time.perf_counter()
            fn(state, x).block_until_ready()
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]
