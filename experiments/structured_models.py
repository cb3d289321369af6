"""The two NNX models of the structured job (experiments/structured_job.py), channels last.

* :class:`ResNet`: a CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 conv-BN-relu
  stem, three stages of basic blocks (examples/resnet.py's :class:`Block`) at widths
  ``w``, ``2w``, ``4w``, the first block of stages 2 and 3 halving the resolution through a
  1x1 projection shortcut, global average pooling, a dense head.
* :class:`ViT`: a small vision transformer (Dosovitskiy et al. 2021): a patch embedding
  (a conv whose stride is its window), a learned position embedding, pre-norm blocks of
  multi-head self-attention and a GELU MLP, a final LayerNorm, mean pooling over the
  tokens, a dense head.

Both are built on the host with nnx's default scales (examples/resnet.py's
:func:`host_init`): jitted initialisers would compile for every seed.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.resnet import Block, host_init, lecun_fill

__all__ = ["ResNet", "ViT", "make_resnet", "make_vit"]


class ResNet(nnx.Module):
    """Stem of ``width`` channels, stages of ``width``, ``2 * width`` and ``4 * width``.

    Args:
      width: channels of the stem and the first stage.
      blocks: basic blocks per stage.
      stem_stride: the stem's stride (2 runs the stages at half the input's resolution).
      num_classes: outputs of the head.
      momentum: BatchNorm's running-average decay (0.9: short runs).
      rngs: nnx's random streams.
    """

    def __init__(
        self,
        width: int,
        *,
        blocks: int,
        stem_stride: int = 1,
        num_classes: int = 10,
        momentum: float = 0.9,
        rngs,
    ):
        self.stem = nnx.Conv(1, width, (3, 3), strides=stem_stride, rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=momentum, rngs=rngs)
        layers, cin = [], width
        for stage in range(3):
            cout = width * 2**stage
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(Block(cin, cout, stride, momentum=momentum, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(layers)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))  # global average pooling


class EncoderBlock(nnx.Module):
    """Pre-norm: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, dim: int, heads: int, mlp: int, *, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, qkv_features=dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
    """Patches of ``patch`` x ``patch`` pixels embedded in ``dim`` features, ``depth`` blocks.

    Args:
      dim: width of the residual stream.
      depth: encoder blocks.
      heads: attention heads per block (``head_dim = dim // heads``).
      mlp: hidden units of each block's MLP.
      patch: side of a patch; the image side must be a multiple of it.
      image: side of the (square, one-channel) input images.
      num_classes: outputs of the head.
      rngs: nnx's random streams.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        heads: int,
        mlp: int,
        patch: int,
        image: int = 28,
        num_classes: int = 10,
        rngs,
    ):
        self.embed = nnx.Conv(1, dim, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
        tokens = (image // patch) ** 2
        # An Embed (not a bare Param) so that the cut knows how to resize its features.
        self.pos = nnx.Embed(tokens, dim, rngs=rngs)
        self.blocks = nnx.List([EncoderBlock(dim, heads, mlp, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.embed(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x + self.pos(jnp.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))  # mean over the tokens


def _vit_fill(path: tuple, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """lecun_fill, with the fan-in of attention's (in, heads, head_dim) kernels and a small
    normal position embedding (ViT's 0.02)."""
    if path[-2:] == ("pos", "embedding"):
        return 0.02 * rng.normal(size=shape)
    if path[-1] == "kernel" and "attn" in path:
        fan_in = np.prod(shape[:-1]) if path[-2] == "out" else shape[0]
        return rng.normal(size=shape) / np.sqrt(fan_in)
    return lecun_fill(path, shape, rng)


def make_resnet(width: int, seed: int = 0, **kwargs) -> ResNet:
    """A :class:`ResNet` initialised on the host (kwargs: its own)."""
    return host_init(lambda rngs: ResNet(width, rngs=rngs, **kwargs), lecun_fill, seed)


def make_vit(dim: int, seed: int = 0, **kwargs) -> ViT:
    """A :class:`ViT` initialised on the host (kwargs: its own)."""
    return host_init(lambda rngs: ViT(dim, rngs=rngs, **kwargs), _vit_fill, seed)
