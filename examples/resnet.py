"""A small ResNet-style CNN in Flax NNX, used by examples/resnet_surgery.py.

conv-BN-relu stem, two residual stages of basic blocks (the first block of stage 2 halves
the resolution and doubles the width through a 1x1 projection shortcut; every other block
has an identity shortcut), global average pooling, a dense head. Channels last (NHWC).

The model is initialised on the host (:func:`make_resnet`): nnx's initialisers jitted
together cost about 7 s of compilation on a 2-core CPU for this small model, every time
a new width or seed is traced, which is more than the whole quick example may take.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Block", "ResNet", "host_init", "make_resnet"]


class Block(nnx.Module):
    """A basic block: conv-BN-relu, conv-BN, plus the shortcut, relu.

    The shortcut is the identity when the shape is unchanged, else a 1x1 strided conv.
    """

    def __init__(self, cin: int, cout: int, stride: int, *, momentum: float, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, momentum=momentum, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=momentum, rngs=rngs)
        self.proj = (
            nnx.Conv(cin, cout, (1, 1), strides=stride, rngs=rngs)
            if cin != cout or stride != 1
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet(nnx.Module):
    """Stem of ``width`` channels, stages of ``width`` and ``2 * width``, dense head.

    Args:
      width: channels of the stem and the first stage.
      blocks: basic blocks per stage.
      num_classes: outputs of the head.
      in_channels: channels of the input images.
      momentum: BatchNorm's running-average decay. 0.9 rather than nnx's 0.99: a short run
        (the quick example trains 60 steps) otherwise evaluates with statistics that are
        still mostly their initial values.
      rngs: nnx's random streams.
    """

    def __init__(
        self,
        width: int,
        *,
        blocks: int = 2,
        num_classes: int = 10,
        in_channels: int = 1,
        momentum: float = 0.9,
        rngs: nnx.Rngs,
    ):
        self.stem = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=momentum, rngs=rngs)
        self.stage1 = nnx.List(
            [Block(width, width, 1, momentum=momentum, rngs=rngs) for _ in range(blocks)]
        )
        self.stage2 = nnx.List(
            [
                Block(width if b == 0 else 2 * width, 2 * width, 2 if b == 0 else 1,
                      momentum=momentum, rngs=rngs)
                for b in range(blocks)
            ]
        )  # fmt: skip
        self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.stem(x)))
        for block in (*self.stage1, *self.stage2):
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))  # global average pooling


def host_init(
    build: Callable[[nnx.Rngs], nnx.Module],
    fill: Callable[[tuple, tuple[int, ...], np.random.Generator], np.ndarray],
    seed: int = 0,
) -> nnx.Module:
    """``build(rngs)`` with every variable set on the host by ``fill(path, shape, rng)``.

    The module is built abstractly (``nnx.eval_shape``: no initialiser runs), then each
    variable gets ``fill``'s NumPy array; ``path`` is the variable's path of plain keys,
    e.g. ``('stage1', 0, 'bn1', 'var')``.
    """
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def one(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        keys = tuple(k for k in keys if k is not None)
        return jnp.asarray(fill(keys, tuple(leaf.shape), rng), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(one, state))


def lecun_fill(path: tuple, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """nnx's defaults: kernels normal with variance 1 / fan-in, BatchNorm at identity.

    (nnx draws kernels from a truncated normal of the same variance; a plain normal is
    used here.)
    """
    name = path[-1]
    if name == "kernel":
        return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    if name in ("scale", "var"):
        return np.ones(shape)
    if name in ("bias", "mean"):
        return np.zeros(shape)
    raise ValueError(f"lecun_fill: no rule for the variable {path} of shape {shape}.")


def make_resnet(width: int, seed: int = 0, **kwargs) -> ResNet:
    """A :class:`ResNet` initialised on the host with nnx's default scales (kwargs: its own)."""
    return host_init(lambda rngs: ResNet(width, rngs=rngs, **kwargs), lecun_fill, seed)
