"""A scan over stacked layers whose backward hands each layer's weight gradient out in the dtype the
layer computes with (issue 22 part 3).

Differentiated through `jax.lax.scan`, a layer loop that reads its weights from stacks [L, ...]
closed over by the body (lard_jax.model.paired_decoder) accumulates their cotangent in a carry of the
stacks' dtype: with float32 trainable q/k/v/o on Llama-2-7B that is one float32 buffer as large as
the trainable stacks (6-8 GiB), allocated when the backward starts, beside every layer's residuals,
where the unrolled loop makes each layer's gradient only when it reaches that layer. Yet each layer's
gradient is bfloat16 before JAX casts it to float32: Flax's Dense casts its float32 kernel to the
compute dtype, and the transpose of that cast is the cast back. `layer_scan` runs the same layers with
a custom VJP whose backward scan emits every layer's gradient with respect to that cast, in bfloat16,
and casts the stacked result to float32 once the scan is done: the same numbers (the cast is
lossless), half the buffer at the backward's peak.

How: the forward scan linearizes each layer with `jax.vjp` (so the layer's own `jax.checkpoint`
policies decide what is saved, exactly as under JAX's scan) and stacks the residuals of the VJP
function, minus those that are the layer's parameter slices or the loop's constants (found by
identity): the backward recomputes those from the stacks instead of keeping a copy per layer.

Contract: `step(layer, consts, plain, diff, x) -> (plain, diff)`. `stacks` is a pair
(plain_stacks, diff_stacks) of trees of [L, ...] arrays and `layer` the pair of their slices at the
layer's index, every leaf passed through `view` (what the layer computes with; `view` must not
change what the layer computes, e.g. the cast a Dense layer makes itself, so the forward does not
depend on what is differentiated). `plain` is a carry that is never differentiated (the teacher's
hidden state), computed from `plain_stacks`, which take no gradient either; `diff` is the
differentiated carry (the student's hidden state, running loss sums); `consts` are loop invariants
(RoPE tables, masks) and `x` the layer's slice of `xs`. Only `diff_stacks` and `diff` may carry
gradients in; a perturbed `plain_stacks`, `plain`, `consts` or `xs`, or a differentiated value
`step` closes over, is refused (values `step` closes over are hoisted into explicit inputs by
tracing it once). Reverse mode only: forward-mode differentiation (jax.jvp) of a custom VJP is not
defined; `LlamaConfig.scan_grads="jax"` keeps JAX's own scan for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def _slice(leaf, i):
    return jax.lax.dynamic_index_in_dim(leaf, i, 0, keepdims=False)


def _is_perturbed(leaf) -> bool:
    return bool(leaf.perturbed)


def _refuse_perturbed(tree, what: str) -> None:
    if any(map(_is_perturbed, jax.tree_util.tree_leaves(tree))):
        raise NotImplementedError(f"layer_scan: gradients with respect to {what} are not supported")


def _hoisted_step(step, layer, consts, plain, diff, x):
    """(step2, hoisted): `step` traced once on the layer's shapes, the values it closes over (the
    jaxpr's constants: tracers of an enclosing trace, or arrays) returned as explicit inputs, and
    step2(layer, (consts, hoisted), plain, diff, x) evaluating that jaxpr. A custom VJP must not
    close over tracers (under jit of grad of checkpoint, or grad outside a micro-batch scan, they
    would leak)."""
    closed, out_shape = jax.make_jaxpr(step, return_shape=True)(layer, consts, plain, diff, x)
    out_tree = jax.tree_util.tree_structure(out_shape)

    def step2(layer, consts2, plain, diff, x):
        consts, hoisted = consts2
        leaves = jax.tree_util.tree_leaves((layer, consts, plain, diff, x))
        return jax.tree_util.tree_unflatten(out_tree, jax.core.eval_jaxpr(closed.jaxpr, hoisted, *leaves))

    return step2, list(closed.consts)


def layer_scan(
    step: Callable,
    stacks: Any,
    consts: Any,
    plain: Any,
    diff: Any,
    xs: Any,
    *,
    length: int,
    view: Callable[[tuple, jax.Array], jax.Array] = lambda path, a: a,
):
    """(plain, diff) after layers [0, length) of `stacks` = (plain_stacks, diff_stacks), each run
    as `step` (module docstring). `view(path, slice)` maps a leaf's layer slice to what the layer
    computes with (e.g. a Dense kernel's cast to bfloat16; path[0] is 0 for plain_stacks, 1 for
    diff_stacks); the gradient with respect to diff_stacks is the backward's per-layer gradients of
    those views, cast to each stack's dtype and zero above `length`."""
    stack_leaves, stack_def = jax.tree_util.tree_flatten_with_path(stacks)
    paths = tuple(p for p, _ in stack_leaves)

    def layer_of(leaves, i):
        """Every leaf's view of layer i, in `stacks`' leaf order."""
        return [view(p, _slice(a, i)) for p, a in zip(paths, leaves)]

    example = stack_def.unflatten(
        [jax.eval_shape(lambda a, p=p: view(p, a[0]), a) for p, a in zip(paths, (a for _, a in stack_leaves))]
    )
    x0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    step, hoisted = _hoisted_step(step, example, consts, plain, diff, x0)
    consts = (consts, hoisted)

    def run(stacks, consts, plain, diff, xs):
        leaves = jax.tree_util.tree_leaves(stacks)

        def body(carry, ix):
            plain, diff = carry
            i, x = ix
            return step(stack_def.unflatten(layer_of(leaves, i)), consts, plain, diff, x), None

        (plain, diff), _ = jax.lax.scan(body, (plain, diff), (jnp.arange(length, dtype=jnp.int32), xs))
        return plain, diff

    fn = jax.custom_vjp(run)
    meta = {}  # what the forward's tracing learned for the backward's: perturbation, treedef, identities

    def fwd(stacks, consts, plain, diff, xs):
        _refuse_perturbed(consts, "`consts` or values `step` closes over")
        _refuse_perturbed(plain, "the `plain` carry")
        _refuse_perturbed(stacks[0], "plain_stacks (stacks[0])")
        _refuse_perturbed(xs, "`xs`")
        pert = tuple(_is_perturbed(a) for a in jax.tree_util.tree_leaves(stacks))
        leaves = [a.value for a in jax.tree_util.tree_leaves(stacks)]
        consts, plain, diff, xs = jax.tree_util.tree_map(lambda a: a.value, (consts, plain, diff, xs))

        def body(carry, ix):
            consts, plain, diff = carry  # consts ride in the carry, so the body sees them as its own values
            i, x = ix
            views = layer_of(leaves, i)
            train = [v for v, d in zip(views, pert) if d]

            def g(train, diff):
                it = iter(train)
                layer = stack_def.unflatten([next(it) if d else v for v, d in zip(views, pert)])
                plain_out, diff_out = step(layer, consts, plain, diff, x)
                return diff_out, plain_out

            diff, vjp_fn, plain = jax.vjp(g, train, diff, has_aux=True)
            res, res_def = jax.tree_util.tree_flatten(vjp_fn)
            known = {id(v): k for k, v in enumerate(views)}
            known.update({id(c): len(views) + k for k, c in enumerate(jax.tree_util.tree_leaves(consts))})
            refs = tuple(known.get(id(r)) for r in res)
            meta.update(res_def=res_def, refs=refs, pert=pert)
            return (consts, plain, diff), [r for r, k in zip(res, refs) if k is None]

        index = jnp.arange(length, dtype=jnp.int32)
        (_, plain, diff), saved = jax.lax.scan(body, (consts, plain, diff), (index, xs))
        return (plain, diff), (leaves, consts, saved)

    def bwd(res, cts):
        leaves, consts, saved = res
        _, ct_diff = cts
        ct_diff = jax.tree_util.tree_map(
            lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c,
            ct_diff,
            is_leaf=lambda c: isinstance(c, SymbolicZero),
        )
        res_def, refs, pert = meta["res_def"], meta["refs"], meta["pert"]

        def body(ct, ix):
            i, saved_i = ix
            pool = layer_of(leaves, i) + jax.tree_util.tree_leaves(consts)
            it = iter(saved_i)
            vjp_fn = res_def.unflatten([next(it) if k is None else pool[k] for k in refs])
            ct_train, ct_prev = vjp_fn(ct)
            return ct_prev, ct_train

        index = jnp.arange(length, dtype=jnp.int32)
        ct_diff0, ct_layers = jax.lax.scan(body, ct_diff, (index, saved), reverse=True)
        it = iter(ct_layers)
        ct_stacks = []
        for a, d in zip(leaves, pert):
            if not d:
                ct_stacks.append(None)
                continue
            g = next(it).astype(a.dtype)
            if length < a.shape[0]:
                g = jnp.concatenate([g, jnp.zeros((a.shape[0] - length, *a.shape[1:]), a.dtype)])
            ct_stacks.append(g)
        return stack_def.unflatten(ct_stacks), None, None, ct_diff0, None

    fn.defvjp(fwd, bwd, symbolic_zeros=True)
    plain, diff = fn(stacks, consts, plain, diff, xs)
    return jax.lax.stop_gradient(plain), diff
