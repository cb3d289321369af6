"""Trained quantization: keep training after :func:`~fisher_optax.quantize`, moving the codebooks.

Deep Compression (Han, Mao, Dally 2016, section 3.3) fine-tunes the shared values after
weight sharing: every weight stays tied to its codebook entry, the gradient of an entry is
the sum of the gradients of its weights, and only the entries move. :func:`share_codebooks`
does this as an optax wrapper: its params are the dense dequantized tree (so it sits in an
``optax.chain``, under ``jit`` and under ``flax.nnx.Optimizer`` like any optimizer), the
wrapped optimizer runs on the codebook entries (Adam's moments live per entry), and each
entry's update is broadcast back to its weights. :func:`requantize` reads the trained
entries back into a :class:`~fisher_optax.QuantizedParams` with the same codes, ready for
:func:`~fisher_optax.save_compressed`.

The other way round, quantization-aware training keeps the codebooks and moves the weights:
the model computes with :func:`fake_quantize` (every weight replaced by its nearest entry,
the gradient passed straight through to the float weight), so weights can change entries;
:func:`reassign` then codes the trained weights with the nearest entries.
"""

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fisher_optax import _validate
from fisher_optax._tree import check_matching
from fisher_optax._types import Params
from fisher_optax.quantize import QuantizedParams, _whole

__all__ = ["ShareCodebooksState", "fake_quantize", "reassign", "requantize", "share_codebooks"]

RAW: dict[str, str] = {
    "train": "leaves that q stores raw (not quantized) are trained by the inner optimizer",
    "freeze": "leaves that q stores raw get zero updates",
}


class ShareCodebooksState(NamedTuple):
    """State of :func:`share_codebooks`.

    Attributes:
      segments: per leaf of the params (a tuple in flattening order), an int32 array shaped
        like the leaf: the index of the weight's entry in the leaf's codebooks laid end to
        end (widths ascending), or the number of entries for a pruned weight; ``None`` for
        a leaf that ``q`` stores raw. Held in the state, not the closure, so that ``jit``
        takes it as an argument instead of baking a params-sized constant into the program.
      inner_state: the state of the wrapped optimizer, over the codebook tree (see
        :func:`share_codebooks`): its moments have one value per codebook entry.
    """

    segments: tuple[Any, ...]
    inner_state: optax.OptState


class _Leaf(NamedTuple):
    """What :func:`share_codebooks` needs of one leaf of ``q`` (host-side, concrete)."""

    path: str
    shape: tuple[int, ...]
    raw: bool  # stored as it is, not quantized
    trainable: bool  # a float raw leaf (an int raw leaf, e.g. a step counter, never trains)
    widths: tuple[int, ...]  # ascending; () for a raw leaf
    books: tuple[np.ndarray, ...]  # one codebook per width
    bits: np.ndarray | None  # shaped like the leaf; 0 = pruned
    codes: np.ndarray | None


def _books(q: QuantizedParams, i: int) -> tuple[Any, ...]:
    """Leaf ``i``'s codebooks in ascending width order (a dict by width, or a tuple)."""
    books = q.codebooks[i]
    return tuple(books.values()) if isinstance(books, dict) else tuple(books)


def _is_raw(q: QuantizedParams, i: int) -> bool:
    quantized = getattr(q, "quantized", None)
    return quantized is not None and not quantized[i]


def _is_floating(dtype: str) -> bool:
    """Whether the dtype named ``dtype`` is floating; an extended dtype (a PRNG key) is not."""
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:  # 'key<fry>' and other extended dtypes have no NumPy dtype
        return False


def _layout(q: Any, name: str = "q") -> list[_Leaf]:
    if not isinstance(q, QuantizedParams):
        raise TypeError(
            f"{name} must be the QuantizedParams returned by quantize (or load_compressed), "
            f"got {type(q).__name__}."
        )
    out = []
    for i, (path, shape, dtype) in enumerate(zip(q.paths, q.shapes, q.dtypes, strict=True)):
        if _is_raw(q, i):
            floating = _is_floating(dtype)
            out.append(_Leaf(path, tuple(shape), True, floating, (), (), None, None))
            continue
        try:
            # Codes spread over processes are gathered: which weights share an entry is
            # read whole on every process.
            bits = np.asarray(_whole(q.bits[i])).astype(np.int64)
            codes = np.asarray(_whole(q.codes[i])).astype(np.int64)
            books = tuple(np.asarray(b) for b in _books(q, i))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            raise TypeError(
                f"{name} at {path} is traced; the codes fix which weights share an entry and "
                "must be concrete. Build the transformation outside jit."
            ) from None
        widths = tuple(int(b) for b in q.widths[i])
        axis = (getattr(q, "axes", None) or (None,) * len(q.paths))[i]
        if axis is not None:
            # Per-slice codebooks (quantize(axis=)): book (C, K) read row-major, so the
            # weight in slice c with code k holds entry c * K + k of the flat book.
            view = [1] * len(shape)
            view[axis] = shape[axis]
            slice_of = np.arange(shape[axis]).reshape(view)
            for b, book in zip(widths, books, strict=True):
                sel = bits == b
                codes = np.where(
                    sel, np.broadcast_to(slice_of, shape) * book.shape[1] + codes, codes
                )
            books = tuple(book.reshape(-1) for book in books)
        out.append(_Leaf(path, tuple(shape), False, False, widths, books, bits, codes))
    return out


def _offsets(leaf: _Leaf) -> np.ndarray:
    """Start of each width's codebook when a leaf's codebooks are laid end to end."""
    return np.cumsum([0] + [len(b) for b in leaf.books])


def _segments(leaf: _Leaf) -> np.ndarray:
    """Per weight, its entry's index in the concatenated codebooks; pruned -> entry count."""
    off = _offsets(leaf)
    seg = np.full(leaf.shape, off[-1], np.int64)
    for j, b in enumerate(leaf.widths):
        sel = leaf.bits == b
        seg[sel] = off[j] + leaf.codes[sel]
    return seg.astype(np.int32)


def _members(leaf: _Leaf) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per entry of the leaf's codebooks, the flat index of one weight that holds it (0 for
    an entry no weight uses) and whether there is one; ``(None, None)`` for a raw leaf.

    Reading the entries out of the params through one member each is exact (members are
    equal) and costs K gathers instead of a pass over the leaf.
    """
    if leaf.raw:
        return None, None
    k = int(_offsets(leaf)[-1])
    flat = _segments(leaf).reshape(-1)
    first = np.zeros(k + 1, np.int64)
    order = np.argsort(flat, kind="stable")
    idx = np.searchsorted(flat[order], np.arange(k + 1))
    has = np.bincount(flat, minlength=k + 1) > 0
    first[has] = order[idx[has]]
    return first[:k].astype(np.int32), has[:k]


def _leaves_like_q(q: QuantizedParams, tree: Any, name: str) -> list[Any]:
    """Leaves of ``tree`` in order, checked path by path and shape by shape against ``q``."""
    _validate.arrays_only(tree, name)
    shapes = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in q.shapes]
    reference = jax.tree.unflatten(q.treedef, shapes)
    return check_matching(reference, tree, ref_name="q", other_name=name)


def _read_entries(leaf: _Leaf, x: Any, name: str) -> tuple[np.ndarray, ...]:
    """The codebooks that ``x`` (one dense leaf) holds, checked: each weight equals its entry.

    An entry with no weights (an empty cluster) keeps its value in ``q``.
    """
    x = np.asarray(_whole(x))
    books = []
    for b, book in zip(leaf.widths, leaf.books, strict=True):
        sel = leaf.bits == b
        codes = leaf.codes[sel]
        vals = x[sel].astype(book.dtype)
        new = book.copy()
        # The last write wins; every member must then agree with it.
        new[codes] = vals
        bad = vals != new[codes]
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            index = tuple(int(j) for j in np.argwhere(sel)[k])
            c = int(codes[k])
            raise ValueError(
                f"{name} at {leaf.path} holds {int(bad.sum())} weight(s) that left their "
                f"codebook entry (first at index {index}: {vals[k]}, while another weight of "
                f"entry {c} of the {b}-bit codebook holds {new[c]}). Train with "
                "share_codebooks (and nothing after it in the chain that changes single "
                "weights), starting from dequantize(q)."
            )
        books.append(new)
    pruned = leaf.bits == 0
    if np.any(x[pruned] != 0):
        k = tuple(int(j) for j in np.argwhere(pruned & (x != 0))[0])
        raise ValueError(
            f"{name} at {leaf.path} holds {int(np.sum(x[pruned] != 0))} nonzero pruned "
            f"weight(s) (first at index {k}: {x[k]}); a pruned weight must stay exactly 0. "
            "Train with share_codebooks, starting from dequantize(q)."
        )
    return tuple(books)


def share_codebooks(
    inner: optax.GradientTransformation,
    q: QuantizedParams,
    *,
    raw: Literal["train", "freeze"] = "train",
) -> optax.GradientTransformation:
    r"""Train the codebook entries of ``q``, not the weights: tied weights move together.

    The params are the dense tree ``dequantize(q)`` (what the model computes with). Weight
    :math:`i` of a leaf holds the entry :math:`c_{a_i}` of its group's codebook, so by the
    chain rule the gradient of an entry is the sum of its weights' gradients (Han et al.
    2016, section 3.3):

    .. math::
      \frac{\partial L}{\partial c_k} = \sum_{i : a_i = k} \frac{\partial L}{\partial w_i} .

    ``update`` sums the incoming dense updates per entry (a ``segment_sum`` over the codes
    of each width group of each leaf), runs ``inner`` on the tree of codebooks (so its
    moments, learning rate and weight decay act per entry), and gives every weight its
    entry's update. Pruned weights get 0 and stay exactly 0. The weights of one entry
    hold the same value and get the same update, so they stay exactly equal to each other
    after ``optax.apply_updates``; :func:`requantize` reads the entries back.

    The tree ``inner`` sees is a dict from each leaf's path (``"['dense']['kernel']"``) to
    the tuple of its codebooks (one 1-D array per width, widths ascending, as in
    ``q.codebooks``; per-channel codebooks from ``quantize(axis=)``, ``(C, K)`` in ``q``,
    are flattened row-major, slice by slice); a float leaf that ``q`` stores raw maps to
    the dense leaf itself when ``raw="train"`` and is left out when ``raw="freeze"``. A raw
    leaf that is not a float (a step counter) is never trained: its update is 0.

    Put it last in an ``optax.chain``: transforms before it (``clip_by_global_norm``, a
    schedule-free scale, ...) act on the dense gradients, which is what the model sees; a
    transform after it that changes single weights (weight decay on the dense params)
    would untie them. Weight decay belongs in ``inner`` (it then decays the entries).

    Args:
      inner: the optimizer of the entries, e.g. ``optax.adam(1e-3)``.
      q: the :class:`~fisher_optax.QuantizedParams` being fine-tuned; its codes must be
        concrete (build the transformation outside ``jit``).
      raw: what happens to leaves that ``q`` stores raw (not quantized), e.g. biases:
        ``"train"`` (default) trains them with ``inner`` as ordinary params, ``"freeze"``
        gives them zero updates.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ShareCodebooksState`.
      ``init`` checks (when the params are concrete) that the params are ``dequantize(q)``:
      each weight equals its entry and pruned weights are 0. ``update`` needs ``params``
      only when ``inner`` does (e.g. for weight decay).

    Raises:
      TypeError: if ``inner`` is not a GradientTransformation or ``q`` not a
        QuantizedParams (or traced).
      ValueError: on an unknown ``raw``; in ``init``/``update``, on params or updates
        whose leaves do not match ``q`` (the leaf is named), or, in ``init``, on params
        that are not ``dequantize(q)``.

    Examples:
      >>> import jax.numpy as jnp, optax, fisher_optax
      >>> params = {"w": jnp.array([[-1.0, -0.8, 0.0], [0.5, 1.0, 1.5]])}
      >>> q = fisher_optax.quantize(params, 1, mask={"w": params["w"] != 0})
      >>> dense = fisher_optax.dequantize(q)
      >>> dense["w"]
      Array([[-0.9, -0.9,  0. ],
             [ 1. ,  1. ,  1. ]], dtype=float32)
      >>> tx = fisher_optax.share_codebooks(optax.sgd(0.1), q)
      >>> state = tx.init(dense)
      >>> grads = {"w": jnp.array([[1.0, 1.0, 5.0], [0.0, 1.0, 2.0]])}
      >>> updates, state = tx.update(grads, state, dense)
      >>> updates["w"]  # -0.1 * (1 + 1) for one entry, -0.1 * (0 + 1 + 2) for the other
      Array([[-0.2, -0.2,  0. ],
             [-0.3, -0.3, -0.3]], dtype=float32)
      >>> dense = optax.apply_updates(dense, updates)
      >>> fisher_optax.requantize(dense, q).codebooks[0]
      {1: Array([-1.1,  0.7], dtype=float32)}

    References:
      Han, Mao, Dally. Deep Compression: Compressing Deep Neural Networks with Pruning,
      Trained Quantization and Huffman Coding. ICLR 2016. https://arxiv.org/abs/1510.00149
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"inner must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got "
            f"{type(inner).__name__}."
        )
    _validate.choice(raw, "raw", RAW)
    layout = _layout(q)
    train_raw = raw == "train"
    offsets = [_offsets(leaf) for leaf in layout]
    reps, filled = zip(*(_members(leaf) for leaf in layout), strict=True)

    def to_entries(leaves, segments, reduce):
        tree = {}
        for i, (leaf, x) in enumerate(zip(layout, leaves, strict=True)):
            if leaf.raw:
                if train_raw and leaf.trainable:
                    tree[leaf.path] = x
                continue
            if not leaf.widths:  # every weight of the leaf pruned: no entries
                tree[leaf.path] = ()
                continue
            flat = reduce(i, jnp.reshape(x, -1), segments[i].reshape(-1))
            tree[leaf.path] = tuple(jnp.split(flat, offsets[i][1:-1]))
        return tree

    def sum_grads(i, g, seg):
        dtype = jnp.result_type(layout[i].books[0].dtype, g.dtype)
        k = int(offsets[i][-1])
        return jax.ops.segment_sum(g.astype(dtype), seg, num_segments=k + 1)[:k]

    def read_params(i, p, seg):
        del seg
        vals = p[jnp.asarray(reps[i])].astype(layout[i].books[0].dtype)
        return jnp.where(jnp.asarray(filled[i]), vals, jnp.asarray(np.concatenate(layout[i].books)))

    def init_fn(params):
        leaves = _leaves_like_q(q, params, "params")
        segments = tuple(None if leaf.raw else jnp.asarray(_segments(leaf)) for leaf in layout)
        if any(not _validate.is_concrete(x) for x in leaves):  # init under jit
            entries = to_entries(leaves, segments, read_params)
        else:  # on the host: check the ties, and read the entries without compiling
            entries = {}
            for leaf, x in zip(layout, leaves, strict=True):
                if not leaf.raw:
                    books = _read_entries(leaf, x, "params")
                    entries[leaf.path] = tuple(jnp.asarray(b) for b in books)
                elif train_raw and leaf.trainable:
                    entries[leaf.path] = x
        return ShareCodebooksState(segments=segments, inner_state=inner.init(entries))

    def update_fn(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        _leaves_like_q(q, updates, "updates")
        g = to_entries(leaves, state.segments, sum_grads)
        p = None
        if params is not None:
            p = to_entries(_leaves_like_q(q, params, "params"), state.segments, read_params)
        u, inner_state = inner.update(g, state.inner_state, p)
        out = []
        for i, (leaf, x) in enumerate(zip(layout, leaves, strict=True)):
            if leaf.raw:
                out.append(u[leaf.path] if train_raw and leaf.trainable else jnp.zeros_like(x))
                continue
            if not leaf.widths:
                out.append(jnp.zeros_like(x))
                continue
            # Entry K (one past the last) is the pruned weights' update: exactly 0.
            flat = jnp.concatenate([*u[leaf.path], jnp.zeros((1,), u[leaf.path][0].dtype)])
            out.append(flat[state.segments[i]].astype(x.dtype))
        return jax.tree.unflatten(treedef, out), ShareCodebooksState(state.segments, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def requantize(params: Params, q: QuantizedParams) -> QuantizedParams:
    """The :class:`~fisher_optax.QuantizedParams` that ``params`` holds: ``q``'s codes, new entries.

    Reads every codebook entry from the dense params trained with :func:`share_codebooks`
    and checks that each weight still equals its entry and every pruned weight is 0 (so
    ``dequantize(requantize(params, q))`` is ``params``, exactly). An entry that no weight
    uses keeps its value in ``q``. Leaves that ``q`` stores raw take their values from
    ``params``. Runs on the host (NumPy), outside ``jit``.

    Args:
      params: the dense params, a tree of the structure and shapes of ``dequantize(q)``
        (a Flax ``nnx.State`` lines up with a dict of the same paths).
      q: the :class:`~fisher_optax.QuantizedParams` that training started from.

    Returns:
      A :class:`~fisher_optax.QuantizedParams` with ``q``'s bits and codes and the trained
      codebooks, which :func:`~fisher_optax.save_compressed` writes.

    Raises:
      TypeError: if ``q`` is not a QuantizedParams.
      ValueError: naming the leaf, when ``params`` does not match ``q``, a weight differs
        from another weight of its entry, or a pruned weight is not 0.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> q = fisher_optax.quantize({"w": jnp.array([[0.0, 1.0], [2.0, 3.0]])}, 1)
      >>> trained = {"w": jnp.array([[0.25, 0.25], [2.75, 2.75]])}
      >>> fisher_optax.requantize(trained, q).codebooks
      ({1: Array([0.25, 2.75], dtype=float32)},)
    """
    layout = _layout(q)
    leaves = _leaves_like_q(q, params, "params")
    books = []
    for leaf, x in zip(layout, leaves, strict=True):
        books.append(None if leaf.raw else _read_entries(leaf, x, "params"))
    return _rebuild(q, layout, leaves, books)


def _pad_slices(book: np.ndarray, q: Any, i: int, width: int, axis: int) -> np.ndarray:
    """Per-slice ``book`` (C, K) with the entries after each slice's largest code repeating
    its last used entry (0 for a slice with none), as the file stores and reads them."""
    bits, codes = np.asarray(_whole(q.bits[i])), np.asarray(_whole(q.codes[i])).astype(np.int64)
    view = [1] * bits.ndim
    view[axis] = bits.shape[axis]
    channel = np.broadcast_to(np.arange(bits.shape[axis]).reshape(view), bits.shape)
    sel = bits == width
    used = np.zeros(book.shape[0], np.int64)
    np.maximum.at(used, channel[sel], codes[sel] + 1)
    last = book[np.arange(book.shape[0]), np.maximum(used - 1, 0)]
    live = np.arange(book.shape[1])[None, :] < used[:, None]
    return np.where(live, book, np.where(used > 0, last, 0)[:, None]).astype(book.dtype)


def _rebuild(q, layout, leaves, books):
    """``q`` with its codebook leaves (and raw leaves) swapped for the trained ones."""

    def swap(path, old):
        name = getattr(path[0], "name", None)
        i = getattr(path[1], "idx", None) if len(path) > 1 else None
        if name == "codebooks" and i is not None and not layout[i].raw:
            k = path[2]
            j = layout[i].widths.index(int(k.key)) if hasattr(k, "key") else k.idx
            book = np.asarray(books[i][j], dtype=old.dtype).reshape(jnp.shape(old))
            axis = (getattr(q, "axes", None) or (None,) * len(q.paths))[i]
            if axis is not None:
                book = _pad_slices(book, q, i, layout[i].widths[j], axis)
            return jnp.asarray(book)
        if name == "raw" and i is not None and layout[i].raw:
            if isinstance(old, np.ndarray):  # stays NumPy: jnp would narrow 64-bit dtypes
                return np.asarray(leaves[i]).astype(old.dtype)
            return jnp.asarray(leaves[i], dtype=old.dtype)
        return old

    return jax.tree_util.tree_map_with_path(swap, q)


# jnp.searchsorted's method by the number of sorted values searched. On XLA:CPU, comparing
# each weight with every value is one fused pass, 4-11x faster than the binary-search loop
# up to 32 values (a 5-bit codebook's midpoints), and 11-19x slower from 33 on, where it
# stops fusing (benchmarks/bench_search.py).
_COMPARE_ALL_MAX = 32


def _search(sorted_values: jax.Array, x: jax.Array) -> jax.Array:
    n = sorted_values.shape[-1]
    method = "compare_all" if n <= _COMPARE_ALL_MAX else "scan"
    return jnp.searchsorted(sorted_values, x, side="left", method=method)


def _nearest_codes(
    x: jax.Array, bits: jax.Array, books: dict, axis: int | None, first: bool = True
) -> jax.Array:
    """Per weight of width ``b`` (``bits``), the code of the entry of its ``b``-bit codebook
    (of its slice along ``axis`` for per-slice codebooks) nearest to ``x``; ties go to the
    lower code, and with ``first`` so do equal entries (the padding of per-slice rows); 0
    where ``bits`` is 0. Without ``first`` the code may name a later equal entry: the same
    value, one search less."""
    codes = jnp.zeros(jnp.shape(x), jnp.int32)
    for b, book in books.items():
        book = jnp.asarray(book)
        if book.shape[-1] == 0:
            continue
        # Midpoints between neighbours (books ascend): the nearest entry of x is the
        # number of midpoints below it; then the first entry of that value.
        mid = book[..., :-1] + (book[..., 1:] - book[..., :-1]) / 2
        xs = jnp.asarray(x).astype(book.dtype)
        if axis is None:
            code = _search(mid, xs)
            if first:
                code = _search(book, book[code])
        else:
            rows = jnp.moveaxis(xs, axis, 0)

            def row_codes(m, row, r):
                c = _search(m, r)
                return _search(row, row[c]) if first else c

            code = jnp.moveaxis(jax.vmap(row_codes)(mid, book, rows), 0, axis)
        codes = jnp.where(jnp.asarray(bits) == b, code.astype(jnp.int32), codes)
    return codes


def _dequantized_codes(codes: jax.Array, bits: jax.Array, books: dict, axis: int | None):
    """The entries that ``codes`` name (0 where ``bits`` is 0), in the books' dtype."""
    dtype = jnp.result_type(*books.values()) if books else jnp.float32
    out = jnp.zeros(jnp.shape(codes), dtype)
    for b, book in books.items():
        book = jnp.asarray(book, dtype)
        if book.shape[-1] == 0:
            continue
        if axis is None:
            vals = book[codes]
        else:
            rows = jnp.moveaxis(codes, axis, 0)
            vals = jnp.moveaxis(jax.vmap(lambda row, c: row[c])(book, rows), 0, axis)
        out = jnp.where(jnp.asarray(bits) == b, vals, out)
    return out


def fake_quantize(params: Params, q: QuantizedParams) -> Params:
    r"""``params`` with every weight moved to the nearest entry of its codebook in ``q``, for
    quantization-aware training: the gradient passes straight through.

    Weight :math:`w` of width :math:`b` (its slice's codebook for per-slice ``q``) becomes
    :math:`c^\star = \arg\min_k |w - c_k|` over the entries of its ``b``-bit codebook (ties
    go to the lower entry); a weight that ``q`` prunes becomes 0; leaves that ``q`` stores raw
    are returned as they are. ``q`` gives the codebooks and which weights are pruned, not the
    codes: a weight that moved past the midpoint to a neighbouring entry takes that entry.

    The value is the quantized weight and the derivative is the straight-through estimator
    (Bengio, Léonard, Courville 2013): :math:`\partial c^\star / \partial w = 1` for a kept
    weight, 0 for a pruned one. So a loss computed on ``fake_quantize(params, q)`` trains
    the float ``params`` towards weights that quantize well, while the model always runs
    on the quantized ones. :func:`reassign` codes the trained weights. Works under ``jit``
    and ``grad``.

    Args:
      params: the float params, a tree of the structure and shapes of ``dequantize(q)``.
      q: the :class:`~fisher_optax.QuantizedParams` whose codebooks and pruned weights
        apply (e.g. from :func:`~fisher_optax.quantize_to_target`).

    Returns:
      A tree like ``params``, in each leaf's dtype.

    Raises:
      TypeError: if ``q`` is not a QuantizedParams.
      ValueError: naming the leaf, if ``params`` does not match ``q`` in structure or shapes.

    Examples:
      >>> import jax, jax.numpy as jnp, fisher_optax
      >>> w = jnp.array([[-1.0, 0.0], [1.0, 2.0]])
      >>> q = fisher_optax.quantize({"w": w}, 1, mask={"w": w != 0})
      >>> q.codebooks[0][1]
      array([-1. ,  1.5], dtype=float32)
      >>> params = {"w": jnp.array([[0.2, 0.7], [0.3, -2.0]])}
      >>> fisher_optax.fake_quantize(params, q)["w"]
      Array([[-1. ,  0. ],
             [ 1.5, -1. ]], dtype=float32)
      >>> jax.grad(lambda p: fisher_optax.fake_quantize(p, q)["w"].sum())(params)["w"]
      Array([[1., 0.],
             [1., 1.]], dtype=float32)

    References:
      Bengio, Léonard, Courville. Estimating or Propagating Gradients Through Stochastic
      Neurons for Conditional Computation. 2013. https://arxiv.org/abs/1308.3432
    """
    if not isinstance(q, QuantizedParams):
        raise TypeError(
            f"q must be the QuantizedParams returned by quantize (or load_compressed), got "
            f"{type(q).__name__}."
        )
    leaves = _leaves_like_q(q, params, "params")
    out = []
    for x, bits, books, axis in zip(leaves, q.bits, q.codebooks, q.axes, strict=True):
        if bits is None:
            out.append(x)
            continue
        x = jnp.asarray(x)
        bits = jnp.asarray(bits)
        # Only the values count here: no search for the first of equal entries.
        codes = _nearest_codes(jax.lax.stop_gradient(x), bits, books, axis, first=False)
        snapped = _dequantized_codes(codes, bits, books, axis).astype(x.dtype)
        kept = bits > 0
        # snapped + (x - x): the entry exactly (x - x is 0), with x's derivative 1.
        ste = snapped + (x - jax.lax.stop_gradient(x))
        out.append(jnp.where(kept, ste, jnp.zeros((), x.dtype)))
    return jax.tree.unflatten(jax.tree.structure(params), out)


def reassign(params: Params, q: QuantizedParams) -> QuantizedParams:
    """The :class:`~fisher_optax.QuantizedParams` of ``params`` coded with ``q``'s codebooks:
    ``q``'s bit widths and entries, the codes of the nearest entries.

    The end of quantization-aware training with :func:`fake_quantize`:
    ``dequantize(reassign(params, q))`` equals ``fake_quantize(params, q)``. Weights that
    ``q`` prunes stay pruned; leaves that ``q`` stores raw take their values from
    ``params``. The codebooks keep every entry, used or not (:func:`share_codebooks` can
    fine-tune them next). Runs outside ``jit``.

    Args:
      params: the float params, a tree of the structure and shapes of ``dequantize(q)``.
      q: the :class:`~fisher_optax.QuantizedParams` whose codebooks and widths apply.

    Returns:
      A :class:`~fisher_optax.QuantizedParams` with ``q``'s bits and codebooks and new codes
      (and no ``lam``: the codes are the nearest entries, not a rate-distortion choice),
      ready for :func:`~fisher_optax.save_compressed`.

    Raises:
      TypeError: if ``q`` is not a QuantizedParams or is traced.
      ValueError: naming the leaf, if ``params`` does not match ``q``.

    Examples:
      >>> import jax.numpy as jnp, fisher_optax
      >>> w = jnp.array([[-1.0, 0.0], [1.0, 2.0]])
      >>> q = fisher_optax.quantize({"w": w}, 1, mask={"w": w != 0})
      >>> moved = fisher_optax.reassign({"w": jnp.array([[0.2, 0.7], [0.3, -2.0]])}, q)
      >>> moved.codes[0]
      array([[0, 0],
             [1, 0]], dtype=uint8)
      >>> fisher_optax.dequantize(moved)["w"]
      Array([[-1. ,  0. ],
             [ 1.5, -1. ]], dtype=float32)
    """
    layout = _layout(q)
    leaves = _leaves_like_q(q, params, "params")
    codes, raw = [], []
    for leaf, x, books, axis, old, r in zip(
        layout, leaves, q.codebooks, q.axes, q.codes, q.raw, strict=True
    ):
        if leaf.raw:  # as requantize: NumPy stays NumPy (jnp would narrow 64-bit dtypes)
            codes.append(old)
            raw.append(
                np.asarray(x).astype(r.dtype)
                if isinstance(r, np.ndarray)
                else jnp.asarray(x, dtype=r.dtype)
            )
            continue
        books = {b: np.asarray(_whole(book)) for b, book in books.items()}
        new = _nearest_codes(np.asarray(_whole(x)), leaf.bits, books, axis)
        new = np.asarray(new).astype(np.asarray(_whole(old)).dtype)
        codes.append(new if isinstance(old, np.ndarray) else jnp.asarray(new))
        raw.append(None)
    return QuantizedParams(
        q.bits, codes, q.codebooks, raw, treedef=q.treedef, dtypes=q.dtypes, axes=q.axes
    )
