"""The networks of the experiments: pure functions on a params dict, described by frozen configs.

A model is a hashable frozen dataclass (so it can be a static argument of ``jax.jit``) with
``init(key, image_shape) -> params``, ``trunk(params, x) -> features`` (what the fully
connected layers see), ``head(params, features) -> logits`` and ``describe()``. Layers are
named ``conv1``, ``conv2``, ... and ``fc1``, ``fc2``, ...; each holds a ``kernel`` and a
``bias``. :data:`MODELS` names the ones the experiments use:

- ``digits-cnn``: the small CNN of ``make demo`` on 8x8 digits (13,706 parameters).
- ``small-lenet``: LeNet-5's 6 and 16 filters (LeCun et al. 1998) with one FC layer of 256
  (70,934 parameters on 28x28 images), the model of the one-shot study's Fashion-MNIST results.
- ``lenet5``: Caffe's LeNet-5 as Deep Compression reports it (Han et al. 2016): conv 5x5x20
  VALID, max-pool 2, conv 5x5x50, max-pool 2, dense 500 relu, dense 10; 431,080 parameters
  on 28x28 images, 93% of them in ``fc1``.
- ``lenet-300-100``: the MLP 784-300-100-10 of LeCun et al. 1998 (266,610 parameters).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import optax

__all__ = ["CNN", "MLP", "MODELS", "apply", "loss_fn", "n_params", "prunable_tree"]


def _he(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / fan_in)


def _dense(key, n_in, n_out, scale=1.0):
    return {"kernel": _he(key, (n_in, n_out), n_in) * scale, "bias": jnp.zeros(n_out)}


def _pool(x):
    # 2x2 max pooling by reshape: on CPU its gradient is ~2x cheaper than reduce_window's.
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _head(params, h):
    """Dense layers fc1, fc2, ... with relu between them."""
    names = sorted((k for k in params if k.startswith("fc")), key=lambda k: int(k[2:]))
    for i, name in enumerate(names):
        h = h @ params[name]["kernel"] + params[name]["bias"]
        if i < len(names) - 1:
            h = jax.nn.relu(h)
    return h


@dataclasses.dataclass(frozen=True)
class CNN:
    """conv-relu-pool, conv-relu-pool, dense-relu, dense (the LeNet-5 family)."""

    kernel: int
    padding: str  # "SAME" for 8x8 digits, "VALID" (as LeNet-5) for 28x28
    conv: tuple[int, int]
    fc: int
    classes: int = 10

    @partial(jax.jit, static_argnums=(0, 2))
    def init(self, key: jax.Array, image_shape: tuple[int, ...]) -> dict:
        h, w, c = image_shape
        for _ in range(2):
            if self.padding == "VALID":
                h, w = h - self.kernel + 1, w - self.kernel + 1
            h, w = h // 2, w // 2
        flat = h * w * self.conv[1]
        k1, k2, k3, k4 = jax.random.split(key, 4)
        kk = self.kernel * self.kernel
        return {
            "conv1": {
                "kernel": _he(k1, (self.kernel, self.kernel, c, self.conv[0]), kk * c),
                "bias": jnp.zeros(self.conv[0]),
            },
            "conv2": {
                "kernel": _he(
                    k2, (self.kernel, self.kernel, self.conv[0], self.conv[1]), kk * self.conv[0]
                ),
                "bias": jnp.zeros(self.conv[1]),
            },
            "fc1": _dense(k3, flat, self.fc),
            "fc2": _dense(k4, self.fc, self.classes, scale=0.5),
        }

    def _conv(self, x, layer):
        # im2col: the kernel's kh*kw shifted views side by side, then one matmul. Inside a
        # lax.scan of Adam steps on this CPU, XLA's convolution (lax.conv_general_dilated)
        # made a Caffe LeNet-5 step at batch 128 9x slower (0.63 s against 0.07 s); the
        # values agree to float rounding.
        k = layer["kernel"]
        kh, kw, c_in, c_out = k.shape
        if self.padding == "SAME":
            x = jnp.pad(x, ((0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)))
        n, h, w, _ = x.shape
        oh, ow = h - kh + 1, w - kw + 1
        cols = jnp.concatenate(
            [x[:, i : i + oh, j : j + ow, :] for i in range(kh) for j in range(kw)], axis=-1
        )
        y = cols.reshape(n * oh * ow, kh * kw * c_in) @ k.reshape(kh * kw * c_in, c_out)
        return y.reshape(n, oh, ow, c_out) + layer["bias"]

    def trunk(self, params: dict, x: jax.Array) -> jax.Array:
        """The convolutional trunk, flattened: what the FC layers see."""
        x = _pool(jax.nn.relu(self._conv(x, params["conv1"])))
        x = _pool(jax.nn.relu(self._conv(x, params["conv2"])))
        return x.reshape(x.shape[0], -1)

    def head(self, params: dict, h: jax.Array) -> jax.Array:
        return _head(params, h)

    def describe(self) -> str:
        k = f"{self.kernel}x{self.kernel}"
        return (
            f"conv {k}x{self.conv[0]} ({self.padding}) → pool → conv {k}x{self.conv[1]} → pool → "
            f"dense {self.fc} → dense {self.classes}"
        )


@dataclasses.dataclass(frozen=True)
class MLP:
    """Dense layers with relu on the flattened image (LeNet-300-100)."""

    hidden: tuple[int, ...]
    classes: int = 10

    @partial(jax.jit, static_argnums=(0, 2))
    def init(self, key: jax.Array, image_shape: tuple[int, ...]) -> dict:
        sizes = (math.prod(image_shape), *self.hidden, self.classes)
        keys = jax.random.split(key, len(sizes) - 1)
        last = len(sizes) - 2
        return {
            f"fc{i + 1}": _dense(k, a, b, scale=0.5 if i == last else 1.0)
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
        }

    def trunk(self, params: dict, x: jax.Array) -> jax.Array:
        del params
        return x.reshape(x.shape[0], -1)

    def head(self, params: dict, h: jax.Array) -> jax.Array:
        return _head(params, h)

    def describe(self) -> str:
        return " → ".join(["dense " + str(n) for n in (*self.hidden, self.classes)])


MODELS: dict[str, CNN | MLP] = {
    "digits-cnn": CNN(kernel=3, padding="SAME", conv=(16, 32), fc=64),
    "small-lenet": CNN(kernel=5, padding="VALID", conv=(6, 16), fc=256),
    "lenet5": CNN(kernel=5, padding="VALID", conv=(20, 50), fc=500),
    "lenet-300-100": MLP(hidden=(300, 100)),
}
"""The models by name (see the module docstring)."""


def apply(model: CNN | MLP, params: dict, x: jax.Array) -> jax.Array:
    """Logits of ``model`` for the images ``x`` (NHWC)."""
    return model.head(params, model.trunk(params, x))


def loss_fn(model: CNN | MLP, params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    logits = apply(model, params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def n_params(tree) -> int:
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def prunable_tree(params: dict, setting: str) -> dict:
    """Which leaves may be pruned: the FC kernels (``"fc"``) or every kernel (``"all"``)."""
    return {
        layer: {
            name: bool(name == "kernel" and (setting == "all" or layer.startswith("fc")))
            for name in leaves
        }
        for layer, leaves in params.items()
    }
