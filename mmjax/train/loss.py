"""Next-token cross-entropy over packed rows, computed in chunks of tokens.

The full (tokens x vocab) logits never exist at once: each chunk's logits are computed, reduced
to a weighted loss sum (and, when differentiated, to the gradients) and dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.data.batch import IGNORE_INDEX
from mmjax.models.layers import token_matmul, true_first
from mmjax.sharding import constrain


def shift_targets(labels: jax.Array, loss_weights: jax.Array, segment_ids: jax.Array | None = None):
    """Targets for position t are the labels of t+1, within the same packed sample only.

    ``labels`` and ``loss_weights`` are aligned with ``input_ids`` (as the loader emits them).
    Returns (targets, weights) of shape (B, T); the last position and positions whose next token
    belongs to another segment get target -100 and weight 0.
    """
    b = labels.shape[0]
    targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    weights = jnp.concatenate([loss_weights[:, 1:], jnp.zeros((b, 1), loss_weights.dtype)], axis=1)
    valid = targets != IGNORE_INDEX
    if segment_ids is not None:
        nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros((b, 1), segment_ids.dtype)], axis=1)
        valid &= (nxt == segment_ids) & (segment_ids != 0)
    return jnp.where(valid, targets, IGNORE_INDEX), jnp.where(valid, weights, 0.0).astype(jnp.float32)


def _token_ce(logits: jax.Array, targets: jax.Array):
    """Per-token CE, correctness and log-sum-exp from float32 logits (..., V)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.where(targets == IGNORE_INDEX, 0, targets)
    tgt = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == safe
    return lse - tgt, correct, lse


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Reference (un-chunked): returns (sum of w * CE, sum of w, count of correct supervised tokens)."""
    ce, correct, _ = _token_ce(logits, targets)
    valid = targets != IGNORE_INDEX
    return jnp.sum(ce * weights), jnp.sum(weights), jnp.sum(correct & valid)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array,
                          chunk_size: int = 1024, *, transpose_head: bool = False):
    """Same result as ``cross_entropy(hidden @ head, ...)`` (``hidden @ head.T`` with
    ``transpose_head``: a tied (vocab, hidden) embedding) with at most ``chunk_size`` tokens' logits
    alive at a time, forward and backward.

    The loss is linear in its one scalar cotangent, so the forward pass of a differentiated call
    also forms each chunk's logit gradient ``w * (softmax - onehot)`` while the logits are at hand
    and reduces it at once into the hidden-state and head gradients: three (tokens x vocab) products
    per chunk, never a recomputation of the logits in the backward pass (which a checkpointed chunk
    costs: a fourth product, ~25 % of the head's work).

    Only tokens with a target (or a weight) need logits: prompts, image tokens and padding do not.
    They are gathered first (a stable permutation, so the result is the same sum over the same
    tokens), and a chunk holding none of them is skipped at run time (``lax.cond``): the head's
    work follows the supervised tokens, not the row length, with every shape still static."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    w = weights.reshape(-1).astype(jnp.float32)
    needed = (t != IGNORE_INDEX) | (w != 0)
    order = true_first(needed)
    h, t, w = h[order], t[order], w[order]
    n_needed = jnp.sum(needed.astype(jnp.int32))
    n = h.shape[0]
    chunk_size = min(chunk_size, n)
    pad = (-n) % chunk_size
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, h.shape[1]), h.dtype)])
        t = jnp.concatenate([t, jnp.full((pad,), IGNORE_INDEX, t.dtype)])
        w = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])
    k = h.shape[0] // chunk_size
    active = jnp.arange(k, dtype=jnp.int32) * chunk_size < n_needed
    h = constrain(h.reshape(k, chunk_size, -1), (None, "loss_tokens", "act_embed"))
    loss_sum, n_correct = _fused_ce(h, head, t.reshape(k, chunk_size),
                                    w.reshape(k, chunk_size), active, transpose_head)
    return loss_sum, jnp.sum(w), n_correct


def _ce_scan(h, head, t, w, active, transpose_head: bool, with_grads: bool):
    """Scan over the chunks: (loss sum, correct count) and, ``with_grads``, the gradients of the
    loss sum w.r.t. ``h`` (per chunk) and ``head`` (accumulated in float32). A chunk whose
    ``active`` flag is off (no token of it needs logits) is skipped."""
    f32 = jnp.float32

    def skip(carry, xs):
        return carry, (jnp.zeros_like(xs[0]) if with_grads else None)

    def body(carry, xs):
        *xs, on = xs
        return jax.lax.cond(on, chunk, skip, carry, tuple(xs))

    def chunk(carry, xs):
        loss, correct, dhead = carry
        hc, tc, wc = xs
        logits = token_matmul(hc, head, transpose_w=transpose_head, preferred_element_type=f32)
        logits = constrain(logits, ("loss_tokens", "act_vocab"))
        ce, corr, lse = _token_ce(logits, tc)
        loss = loss + jnp.sum(ce * wc)
        correct = correct + jnp.sum(corr & (tc != IGNORE_INDEX))
        if not with_grads:
            return (loss, correct, dhead), None
        safe = jnp.where(tc == IGNORE_INDEX, 0, tc)
        p = jnp.exp(logits - lse[:, None])
        g = (p - jax.nn.one_hot(safe, logits.shape[-1], dtype=f32)) * wc[:, None]
        gc = g.astype(hc.dtype)
        # logits = hc @ head (head.T when tied): d hc = g @ head.T (g @ head), d head = hc.T @ g (g.T @ hc)
        dh = token_matmul(gc, head, transpose_w=not transpose_head, preferred_element_type=f32)
        tokens = (((0,), (0,)), ((), ()))   # the contraction over the chunk's tokens
        dhead = dhead + (jax.lax.dot_general(gc, hc, tokens, preferred_element_type=f32) if transpose_head
                         else jax.lax.dot_general(hc, gc, tokens, preferred_element_type=f32))
        return (loss, correct, dhead), dh.astype(hc.dtype)

    init = (jnp.zeros((), f32), jnp.zeros((), jnp.int32), jnp.zeros(head.shape if with_grads else (), f32))
    (loss, correct, dhead), dh = jax.lax.scan(body, init, (h, t, w, active))
    return loss, correct, dh, dhead


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_ce(h, head, t, w, active, transpose_head):
    loss, correct, _, _ = _ce_scan(h, head, t, w, active, transpose_head, with_grads=False)
    return loss, correct


def _fused_ce_fwd(h, head, t, w, active, transpose_head):
    loss, correct, dh, dhead = _ce_scan(h, head, t, w, active, transpose_head, with_grads=True)
    return (loss, correct), (dh, dhead.astype(head.dtype))


def _fused_ce_bwd(transpose_head, res, cotangents):
    dh, dhead = res
    g = cotangents[0]
    return (g.astype(dh.dtype) * dh, g.astype(dhead.dtype) * dhead, None, None, None)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)
