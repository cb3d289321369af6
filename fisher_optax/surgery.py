"""Surgery on arrays: cut dropped units out of a graph of Dense/Conv kernels, exactly.

Framework-free: the Flax adapters (:func:`fisher_optax.flax.shrink`,
:func:`fisher_optax.flax.shrink_linen`) read a model into :class:`Layer` and :class:`Edge`
records, call :func:`cut_units`, and write the new kernels back. A unit (a Dense column, a
Conv output channel) is *dropped* when the unit mask says so or when all its incoming
weights are zero. The result computes exactly what the original computes with the dropped
units' incoming weights zeroed (the *masked* model): a dropped unit then outputs the
constant ``act(bias)``, which is added to the next layer's bias through the rows that read
it (``act(b) * W_next[row]``, summed over a Conv's window or over the flatten blocks). That
fold is exact for any elementwise activation when the next layer is Dense, or a Conv that
keeps a constant input constant (VALID, CIRCULAR or REFLECT padding). A zero-padded Conv
does not (its border outputs see the padding), so there a unit whose constant is non-zero
is kept, with its incoming weights zeroed, and a warning says how many.

Paths (:attr:`Layer.path`, the keys of :attr:`Cut.index`) are written as
:func:`fisher_optax._tree.keystr` writes them: ``"['layers'][0]"``, ``"['conv1']['kernel']"``.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fisher_optax.structured import Index

__all__: list[str] = []  # used by the framework adapters; nothing re-exported at the top


class Layer(NamedTuple):
    """One Dense or Conv layer, as surgery sees it.

    Attributes:
      name: the layer's name in messages (and in :class:`Edge`).
      path: the path of the layer's parameter subtree, as ``keystr`` writes it
        (``"['layers'][0]"``); its kernel sits at ``path + "['kernel']"``.
      kernel: ``(in, out)`` or ``(*window, in, out)``.
      bias: ``(out,)`` or ``None``.
      constant_exact: a per-channel constant input gives a constant output (a Dense layer;
        a Conv without zero padding or input dilation). Only then can the constant output of
        a dropped unit be folded into this layer's bias.
    """

    name: str
    path: str
    kernel: np.ndarray
    bias: np.ndarray | None
    constant_exact: bool


class Edge(NamedTuple):
    """Producer ``producer`` feeds consumer ``consumer``.

    Attributes:
      producer: name of the producing layer.
      consumer: name of the consuming layer.
      blocks: 1 when the consumer's inputs are the producer's units; ``S > 1`` when the
        producer's ``(*spatial, C)`` output is flattened (NHWC order) into ``S * C`` inputs,
        input ``s * C + c`` coming from unit ``c``.
      constant: maps the producer's biases (a vector) to the constants a dropped unit
        feeds the consumer (``act(bias)``); ``None`` when unknown.
      what: how the pair was found, for messages.
    """

    producer: str
    consumer: str
    blocks: int
    constant: Callable[[np.ndarray], np.ndarray] | None
    what: str = ""


class Cut(NamedTuple):
    """Result of :func:`cut_units`.

    Attributes:
      kernels: new kernel per layer name.
      biases: new bias (or ``None``) per layer name.
      index: kept indices per parameter path (kernel and bias of each changed layer).
      dropped: the dropped unit indices (of the original layer) per layer name.
      kept_inexact: units the mask dropped but surgery kept, with zeroed incoming weights,
        because their constant output could not be folded exactly (per layer name).
    """

    kernels: dict[str, np.ndarray]
    biases: dict[str, np.ndarray | None]
    index: Index
    dropped: dict[str, np.ndarray]
    kept_inexact: dict[str, np.ndarray]


def _dead_units(kernel: np.ndarray) -> np.ndarray:
    return np.all(kernel == 0, axis=tuple(range(kernel.ndim - 1)))


def _one_pass(
    layers: Mapping[str, Layer],
    edges: Sequence[Edge],
    drop: Mapping[str, np.ndarray],
) -> tuple[dict[str, Layer], dict[str, tuple], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Drop ``drop[name]`` (bool ``(out,)``, True drops) plus dead units, once."""
    consumers: dict[str, list[Edge]] = {}
    for e in edges:
        consumers.setdefault(e.producer, []).append(e)
    producer_of = {e.consumer: e for e in edges}

    # Zero the incoming weights of every unit the mask drops: surgery reproduces that model.
    kernels = {}
    for name, layer in layers.items():
        k = np.array(layer.kernel, copy=True)
        if name in drop:
            k[..., np.asarray(drop[name], bool)] = 0
        kernels[name] = k
    biases = {
        n: None if lay.bias is None else np.array(lay.bias, copy=True) for n, lay in layers.items()
    }

    final_drop, kept_inexact = {}, {}
    for name, layer in layers.items():
        n_out = layer.kernel.shape[-1]
        wanted = _dead_units(kernels[name])
        if name not in consumers:
            continue  # output units stay, even dead ones (the model's outputs)
        bias = biases[name] if biases[name] is not None else np.zeros(n_out, kernels[name].dtype)
        blocked = np.zeros(n_out, bool)
        for e in consumers[name]:
            consumer = layers[e.consumer]
            if e.constant is None:
                if not wanted.any():
                    continue
                raise ValueError(
                    f"the pair ({e.producer!r}, {e.consumer!r}) drops units of "
                    f"{e.producer!r}; each outputs the constant act(bias), which must be "
                    f"folded into {e.consumer!r}, and that needs the activation between the "
                    "two layers. Give it as the pair's third element, e.g. "
                    f"({e.producer!r}, {e.consumer!r}, jax.nn.relu), or as activation=."
                )
            const = np.asarray(e.constant(bias), np.float64)
            nonzero = wanted & (const != 0)
            if consumer.bias is None or not consumer.constant_exact:
                blocked |= nonzero
        kept = wanted & blocked
        if kept.any():
            kept_inexact[name] = np.flatnonzero(kept)
        final_drop[name] = wanted & ~blocked
    for name in drop:
        if name not in consumers and np.asarray(drop[name], bool).any():
            raise ValueError(
                f"the unit mask drops units of {name!r}, but no layer consumes its outputs (it "
                "is the model's output layer, or a pair is missing). Leave it out of "
                "unit_mask (prunable=fisher_optax.flax.prunable_units(model)) or name its "
                "consumer in pairs=."
            )

    # Fold each dropped unit's constant into its consumers' biases, from the original rows.
    for name, dropped in final_drop.items():
        if not dropped.any():
            continue
        n_out = layers[name].kernel.shape[-1]
        bias = biases[name] if biases[name] is not None else np.zeros(n_out)
        for e in consumers[name]:
            const = np.where(dropped, np.asarray(e.constant(bias), np.float64), 0.0)
            if not const.any():
                continue
            k = kernels[e.consumer]
            rows = k.reshape(-1, k.shape[-2], k.shape[-1]).sum(axis=0, dtype=np.float64)
            rows = rows.reshape(e.blocks, n_out, k.shape[-1]).sum(axis=0)
            b = biases[e.consumer]
            biases[e.consumer] = (b.astype(np.float64) + const @ rows).astype(b.dtype)

    # Slice: producers lose columns, consumers the matching input rows.
    new_layers, index, dropped_out = {}, {}, {}
    for name, layer in layers.items():
        k, b = kernels[name], biases[name]
        out_keep = None
        if name in final_drop and final_drop[name].any():
            out_keep = np.flatnonzero(~final_drop[name])
            dropped_out[name] = np.flatnonzero(final_drop[name])
        in_keep = None
        e = producer_of.get(name)
        if e is not None and final_drop.get(e.producer) is not None:
            if final_drop[e.producer].any():
                c = layers[e.producer].kernel.shape[-1]
                kept_units = np.flatnonzero(~final_drop[e.producer])
                in_keep = (np.arange(e.blocks)[:, None] * c + kept_units[None, :]).reshape(-1)
        kernel_index = (None,) * (k.ndim - 2) + (in_keep, out_keep)
        k = take_np(k, kernel_index)
        if b is not None:
            b = take_np(b, (out_keep,))
        new_layers[name] = layer._replace(kernel=k, bias=b)
        index[name] = (kernel_index, (out_keep,))
    return new_layers, index, dropped_out, kept_inexact


def take_np(x: np.ndarray, index: tuple[np.ndarray | None, ...]) -> np.ndarray:
    """``x`` with, on each axis, only the entries ``index`` keeps (NumPy)."""
    for axis, ind in enumerate(index):
        if ind is not None:
            x = np.take(x, ind, axis=axis)
    return x


def _compose(first: tuple, second: tuple) -> tuple:
    return tuple(
        b if a is None else (a if b is None else np.asarray(a)[np.asarray(b)])
        for a, b in zip(first, second, strict=True)
    )


def cut_units(
    layers: Mapping[str, Layer],
    edges: Sequence[Edge],
    drop: Mapping[str, np.ndarray],
    *,
    warn: bool = True,
) -> Cut:
    """Remove dropped and dead units from a layer graph, folding their constants exactly.

    A unit is removed when ``drop`` says so or when all its incoming weights are zero, and
    its constant output ``act(bias)`` can be folded exactly into every consumer's bias: the
    constant is 0, or the consumer has a bias and turns a constant input into a constant
    output (Dense; Conv with VALID/CIRCULAR/REFLECT padding). Otherwise the unit is kept with
    its incoming weights zeroed, and a warning says so. Passes repeat while removing rows
    leaves further units dead.

    Args:
      layers: the layers by name.
      edges: who feeds whom; each consumer has at most one producer.
      drop: per layer name, a boolean ``(out,)`` vector, True for units to drop.
      warn: warn about units that could not be removed exactly.

    Returns:
      A :class:`Cut`.

    Raises:
      ValueError: if a consumer has several producers, the mask drops units of a layer that
        feeds no other, or an activation needed for a fold is unknown.
    """
    seen: dict[str, str] = {}
    for e in edges:
        if e.consumer in seen:
            raise ValueError(
                f"{e.consumer!r} is fed by both {seen[e.consumer]!r} and "
                f"{e.producer!r}; a layer with several producers (concatenation) is not "
                "supported."
            )
        seen[e.consumer] = e.producer
    original = dict(layers)
    current = dict(layers)
    total = {n: ((None,) * lay.kernel.ndim, (None,)) for n, lay in layers.items()}
    kept_inexact: dict[str, np.ndarray] = {}
    pending = {n: np.asarray(d, bool) for n, d in drop.items()}
    for _ in range(len(layers) + 1):
        before = dict(total)
        current, index, dropped, kept = _one_pass(current, edges, pending)
        for name, k in kept.items():  # back to the original unit numbers
            out_keep = before[name][1][0]
            kept_inexact[name] = k if out_keep is None else np.asarray(out_keep)[k]
        for name, idx in index.items():
            total[name] = (_compose(total[name][0], idx[0]), _compose(total[name][1], idx[1]))
        pending = {}
        if not dropped:
            break
    dropped_final = {}
    index: Index = {}
    for name, layer in original.items():
        kidx, bidx = total[name]
        if bidx[0] is not None:
            dropped_final[name] = np.setdiff1d(np.arange(layer.kernel.shape[-1]), bidx[0])
        if any(i is not None for i in kidx):
            index[layer.path + "['kernel']"] = kidx
        if layer.bias is not None and bidx[0] is not None:
            index[layer.path + "['bias']"] = bidx
    if warn and kept_inexact:
        detail = ", ".join(f"{n}: {len(k)}" for n, k in kept_inexact.items())
        warnings.warn(
            f"surgery kept units whose constant output act(bias) cannot be folded exactly into "
            f"the next layer (a zero-padded Conv, or a layer without bias): {detail}. Their "
            "incoming weights are zero, so the model is still exact. To remove them, zero their "
            "biases too (expand_unit_mask(..., bias=True) with an activation where act(0) = 0) "
            "or use VALID padding.",
            stacklevel=3,
        )
    return Cut(
        kernels={n: lay.kernel for n, lay in current.items()},
        biases={n: lay.bias for n, lay in current.items()},
        index=index,
        dropped=dropped_final,
        kept_inexact=kept_inexact,
    )
