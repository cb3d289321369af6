"""Training-step overhead of ``fisher_optax.pruned(adam)`` against plain ``optax.adam``.

An MLP on random MNIST-shaped batches; both steps are jitted and timed interleaved, so
load from other processes hits both alike. Between mask updates ``pruned`` adds a masked
gradient, masked moments and a masked update (all fused into Adam's elementwise update) and
a ``lax.cond`` that skips the selection: the ratio of median step times is the overhead.
Two rows time what ``pruned`` computes between mask updates without the ``lax.cond`` (a fixed
mask): the floor under it. The donated update-only functions
return the state first, so that ``jit`` gives each state leaf its own buffer back (see
``make_update``); the script prints the float32 arrays XLA copies in either order, and the
bool arrays (the mask) copied by the updates that are not donated. A mask-update step
(two-stage selection over all kernels, Fisher read from ``nu``) is timed on its own, and so
is the selection alone (``jit(two_stage_mask)`` on the same inputs): the step costs one
update plus the selection. The last row is the floor under the selection on
this backend: the passes a two-stage selection repeats (per stage 4 digit passes and 16
counting passes over one byte per weight), timed bare over the same kernels.

    python benchmarks/bench_step.py            # 784-1024-1024-10 MLP (1.9M params), batch 128
    python benchmarks/bench_step.py --quick    # 784-256-10, fewer steps
"""

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fisher_optax as fo
from fisher_optax import _select, transforms


def init_mlp(key, sizes):
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
            "bias": jnp.zeros(b),
        }
    return params


def loss_fn(params, x, y):
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def make_step(opt, donate: bool = False):
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_update(opt, donate: bool = False, state_first: bool = True):
    """``opt.update`` jitted; with ``donate`` the state is donated.

    ``jit`` pairs each output, in order, with the first donated input of the same shape and
    dtype. Returned as ``opt.update`` returns them, ``(updates, state)``, the updates would
    take the buffers of the first moment and that moment the buffers of the second, which
    XLA then copies (plain Adam as well); the state first pairs each leaf with its own.
    """

    def update(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return (state, updates) if state_first else (updates, state)

    return jax.jit(update, donate_argnums=(1,) if donate else ())


def masked_adam(opt: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """What ``pruned(opt)`` computes between mask updates, without its selection branch: the
    gradients and moments zeroed and the updates of pruned weights set to ``-w`` where the
    fixed ``mask`` prunes. The mask sits in the state unchanged (written anew at every step
    when the state is not donated, as ``pruned``'s)."""

    def init_fn(params):
        return jax.tree.map(jnp.copy, mask), opt.init(params)  # a donated state owns it

    def update_fn(updates, state, params):
        mask, inner_state = state
        grads, inner_state = transforms._zero_pruned(opt, updates, inner_state, mask)
        updates, inner_state = opt.update(grads, inner_state, params)
        masked = transforms._masked_updates(updates, params, jax.tree.leaves(mask))
        return masked, (mask, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def f32_copies(fn, *args) -> int:
    """The float32 arrays that XLA copies in the compiled ``fn(*args)``."""
    hlo = fn.lower(*args).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    return sum(" copy(" in line and "= f32[" in line for line in entry.splitlines())


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    sizes = [784, 256, 10] if args.quick else [784, 1024, 1024, 10]
    steps = 40 if args.quick else args.steps
    batch = 128
    key = jax.random.key(0)
    params = init_mlp(key, sizes)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
    grads = jax.grad(loss_fn)(params, x, y)
    mask = fo.magnitude_mask(params, 0.8)

    plain = optax.adam(1e-3)
    # No mask update in the timed steps (the Fisher methods skip count 0, the next is 10**6);
    # they start from an 80% magnitude mask, so the masking does real work.
    wrapped = fo.pruned(optax.adam(1e-3), schedule=fo.constant_sparsity(0.8), update_every=10**6)
    # A fixed mask, for comparison: keep_pruned only rewrites the updates (no selection branch,
    # no masked gradient or moments).
    fixed = optax.chain(optax.adam(1e-3), fo.keep_pruned(mask))
    # pruned's masking with a fixed mask and no selection branch: the floor under pruned.
    floor = masked_adam(optax.adam(1e-3), mask)

    def init(opt):
        state = opt.init(params)
        return state._replace(mask=copy_tree(mask)) if opt is wrapped else state

    # name -> (jitted fn, kind, optimizer); "step" runs grad + update + apply_updates, "update"
    # only opt.update. The donated variants let XLA update the state (and params) in place,
    # as a training loop usually does.
    timed = {
        ("step", "adam"): (make_step(plain), plain),
        ("step", "pruned"): (make_step(wrapped), wrapped),
        ("step donated", "adam"): (make_step(plain, True), plain),
        ("step donated", "pruned"): (make_step(wrapped, True), wrapped),
        ("step donated", "masked"): (make_step(floor, True), floor),
        ("update", "adam"): (make_update(plain), plain),
        ("update", "pruned"): (make_update(wrapped), wrapped),
        ("update", "keep_pruned"): (make_update(fixed), fixed),
        ("update", "masked"): (make_update(floor), floor),
        ("update donated", "adam"): (make_update(plain, True), plain),
        ("update donated", "pruned"): (make_update(wrapped, True), wrapped),
        ("update donated", "masked"): (make_update(floor, True), floor),
    }
    carry = {}
    for name, (fn, opt) in timed.items():  # compile, and one step to zero the pruned weights
        if name[0].startswith("step"):
            carry[name] = jax.block_until_ready(fn(copy_tree(params), init(opt), x, y))
        else:
            carry[name] = (params, jax.block_until_ready(fn(grads, init(opt), params))[0])
    # The update-only calls all read the same zeroed params (pruned weights at exactly 0).
    p_zero = carry[("step", "pruned")][0]
    times = {name: [] for name in timed}
    for _ in range(steps):  # interleaved, so all see the same machine load
        for name, (fn, _) in timed.items():
            p, s = carry[name]
            t = time.perf_counter()
            if name[0].startswith("step"):
                carry[name] = jax.block_until_ready(fn(p, s, x, y))
            else:
                carry[name] = (p, jax.block_until_ready(fn(grads, s, p_zero))[0])
            times[name].append(time.perf_counter() - t)

    # A mask-update step: with update_every=1 every step from count 1 on selects a new mask
    # (two-stage, global, from the Fisher in nu); time it from the same count-1 state.
    every = fo.pruned(optax.adam(1e-3), schedule=fo.constant_sparsity(0.8), update_every=1)
    upd_every = make_update(every)
    s_every, _ = upd_every(grads, every.init(params), params)  # count 0: no Fisher yet
    s_new, _ = jax.block_until_ready(upd_every(grads, s_every, params))
    selected = sum(int((~m).sum()) for m in jax.tree.leaves(s_new.mask))
    # The selection alone, as the mask-update step runs it (two-stage, global, from the same
    # params, Fisher and mask, float32 sparsity): what a mask update adds to an update.
    fisher = fo.fisher_from_state(s_every.inner_state, params=params)
    alone = jax.jit(lambda p, f, m, s: fo.two_stage_mask(p, s, fisher=f, mask=m))
    sel_args = (params, fisher, s_every.mask, jnp.float32(0.8))
    jax.block_until_ready(alone(*sel_args))

    # The floor under the selection: the passes it repeats, bare, in one jitted loop over
    # the same kernels (one array each, as the selection sees them). Per stage, 4 phases of
    # one digit pass (read a 4-byte key, write its byte) and 4 counting passes (compare one
    # byte per weight with three candidates in one variadic reduction); no bookkeeping.
    kernels = [x for x in jax.tree.leaves(params) if x.ndim >= 2]
    rng = np.random.default_rng(0)
    keys = [jnp.asarray(rng.integers(0, 2**32, x.shape, dtype=np.uint32)) for x in kernels]

    def bare_passes(keys, t):
        def phase(p, t):
            shift = (24 - 8 * (p % 4)).astype(jnp.uint32)
            digits = [
                jnp.where(((k ^ t) >> (shift + 8)) == 0, (k >> shift).astype(jnp.uint8), 255)
                for k in keys
            ]

            def one_pass(i, c):  # candidates move with the counts: no pass can be hoisted
                cands = [(c + j * 64 + i).astype(jnp.uint8) for j in range(1, 4)]
                counts = sum(_select.count_many([d < x for x in cands]) for d in digits)
                return c + jnp.sum(counts).astype(jnp.uint32) % 7

            return lax.fori_loop(0, 4, one_pass, t)

        return lax.fori_loop(0, 8, phase, t)

    floor_fn = jax.jit(bare_passes)
    t_key = jnp.uint32(2**31)
    jax.block_until_ready(floor_fn(keys, t_key))
    upd_plain = timed[("update", "adam")][0]
    s_plain = init(plain)
    # Interleaved with the update they are compared with, so all see the same machine load.
    rounds = {
        "base": lambda: upd_plain(grads, s_plain, params),
        "mask": lambda: upd_every(grads, s_every, params),
        "sel": lambda: alone(*sel_args),
        "floor": lambda: floor_fn(keys, t_key),
    }
    t_round = {name: [] for name in rounds}
    for _ in range(max(10, steps // 4)):
        for name, fn in rounds.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            t_round[name].append(time.perf_counter() - t)
    t_base, t_mask, t_sel, t_floor = (t_round[k] for k in ("base", "mask", "sel", "floor"))

    med = lambda v: float(np.median(v)) * 1e3
    print(
        f"# MLP {'-'.join(map(str, sizes))} ({n_params / 1e6:.2f}M params), batch {batch}, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}, medians of {steps} interleaved steps"
    )
    print("| timed | optax.adam | with pruning | ratio |")
    print("|-------|-----------:|-------------:|------:|")
    rows = [
        ("train step (grad + update), between mask updates", "step", "pruned"),
        ("train step, params and state donated", "step donated", "pruned"),
        ("train step, donated, pruned's masking without its branch", "step donated", "masked"),
        ("optimizer update only, between mask updates", "update", "pruned"),
        ("optimizer update only, state donated", "update donated", "pruned"),
        ("optimizer update only, fixed mask: chain(adam, keep_pruned)", "update", "keep_pruned"),
        ("optimizer update only, pruned's masking without its branch", "update", "masked"),
        ("optimizer update only, the same, state donated", "update donated", "masked"),
    ]
    for label, kind, other in rows:
        base, ours = med(times[(kind, "adam")]), med(times[(kind, other)])
        print(f"| {label} | {base:.2f} ms | {ours:.2f} ms | {ours / base:.3f} |")
    base = med(t_base)  # the update timed in the rounds of the rows below
    print(
        f"| optimizer update at a mask update (two-stage, global) | {base:.2f} ms | "
        f"{med(t_mask):.2f} ms | {med(t_mask) / base:.1f} |"
    )
    print(
        f"| the two-stage selection alone (jit(two_stage_mask)) | {base:.2f} ms | "
        f"{med(t_sel):.2f} ms | {med(t_sel) / base:.1f} |"
    )
    print(
        f"| bare passes of a two-stage selection: 8 x (1 digit + 4 counting passes) "
        f"| {base:.2f} ms | {med(t_floor):.2f} ms | {med(t_floor) / base:.1f} |"
    )
    print(
        f"# mask-update step - selection alone = {med(t_mask) - med(t_sel):.2f} ms "
        f"({(med(t_mask) - med(t_sel)) / base:.2f} updates)"
    )
    # Donated buffers are paired with outputs by shape in output order (make_update): count
    # what XLA copies with the state returned first (the rows above) and as opt.update
    # returns it. Without donation the mask in the returned state is a new buffer written
    # at every step, with the branch or without: count the bool arrays copied.
    counts = {
        order: [
            f32_copies(make_update(opt, True, first), grads, init(opt), params)
            for opt in (plain, wrapped)
        ]
        for order, first in (("state first", True), ("(updates, state)", False))
    }
    print(
        "# float32 arrays copied by the donated update (XLA HLO), adam / pruned: "
        + "; ".join(f"{order} {a} / {b}" for order, (a, b) in counts.items())
    )
    n_bool = []
    for opt in (wrapped, floor):
        hlo = make_update(opt).lower(grads, init(opt), params).compile().as_text()
        entry = hlo[hlo.index("ENTRY") :]
        n_bool.append(sum(" copy(" in line and "= pred[" in line for line in entry.splitlines()))
    print(
        "# bool arrays copied by the update not donated (the mask), pruned / its masking "
        f"without the branch: {n_bool[0]} / {n_bool[1]}"
    )
    pruned_frac = sum(int((~m).sum()) for m in jax.tree.leaves(mask)) / sum(
        m.size for m in jax.tree.leaves(mask) if m.ndim >= 2
    )
    print(
        f"# pruned fraction of kernels in the timed steps: {pruned_frac:.3f}; "
        f"pruned by one mask update: {selected}"
    )


if __name__ == "__main__":
    main()
