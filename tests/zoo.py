"""Small versions of model families written by others, built with random init (no network).

Each builder returns the model (or module and variables) at tiny widths, so a test compiles
it once in a few seconds.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, WIDTH, SEQ = 16, 8, 4


def eqx_mlp(key=0) -> eqx.nn.MLP:
    """An Equinox MLP: ``weight`` is ``(out, in)``; ``activation`` is a non-array leaf."""
    return eqx.nn.MLP(4, 3, WIDTH, 2, key=jax.random.key(key))


class EqxCNN(eqx.Module):
    """An Equinox CNN with BatchNorm, whose running statistics live in ``eqx.nn.State``."""

    conv: eqx.nn.Conv2d
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1)
        self.norm = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")
        self.head = eqx.nn.Linear(4 * 6 * 6, 3, key=k2)

    def __call__(self, x, state):
        x, state = self.norm(jax.nn.relu(self.conv(x)), state)
        return self.head(x.reshape(-1)), state


def eqx_cnn(key=0):
    """``(model, state)`` of :class:`EqxCNN`, inputs ``(1, 6, 6)`` vmapped over ``batch``."""
    return eqx.nn.make_with_state(EqxCNN)(jax.random.key(key))


class EqxLM(eqx.Module):
    """An Equinox attention LM whose output projection is the token embedding (tied)."""

    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=k1)
        self.attn = eqx.nn.MultiheadAttention(2, WIDTH, key=k2)
        self.norm = eqx.nn.LayerNorm(WIDTH)

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens)
        x = x + self.attn(x, x, x)
        x = jax.vmap(self.norm)(x)
        return x @ self.embed.weight.T


def eqx_lm(key=0) -> EqxLM:
    return EqxLM(jax.random.key(key))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(2 * WIDTH)(nn.LayerNorm()(x))
        return x + nn.Dense(WIDTH)(nn.gelu(h)), None


class LinenLM(nn.Module):
    """A Linen LM: ``nn.scan``-stacked blocks and a ``cache`` collection (a decoder's)."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, WIDTH)(tokens)
        cached = self.variable("cache", "cached_key", jnp.zeros, (2, SEQ, WIDTH))
        cached.value = cached.value.at[0].set(x[0])
        blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = blocks()(x, None)
        return nn.Dense(VOCAB)(x)


def linen_lm(key=0):
    """``(module, variables)``: ``{"params": ..., "cache": ...}`` for tokens ``(2, SEQ)``."""
    module = LinenLM()
    return module, module.init(jax.random.key(key), jnp.zeros((2, SEQ), jnp.int32))


class NnxLM(nnx.Module):
    """An NNX LM that keeps an ``nnx.Rngs`` (a PRNG key and a counter) for its dropout."""

    def __init__(self, key=0):
        self.rngs = nnx.Rngs(key)
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=self.rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=self.rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=self.rngs)
        self.norm = nnx.RMSNorm(WIDTH, rngs=self.rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.down(nnx.relu(self.up(self.norm(x))))
        return self.embed.attend(x)


class LinenResNet(nn.Module):
    """A Linen ResNet block stack that takes ``train=`` (BatchNorm in ``batch_stats``)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        for _ in range(2):
            h = nn.Conv(4, (3, 3))(x)
            h = nn.BatchNorm(use_running_average=not train)(h)
            x = x + nn.relu(h)
        return nn.Dense(3)(x.mean((1, 2)))


def linen_resnet(key=0):
    """``(module, variables)`` for images ``(2, 6, 6, 1)``."""
    module = LinenResNet()
    return module, module.init(jax.random.key(key), jnp.zeros((2, 6, 6, 1)), train=False)
