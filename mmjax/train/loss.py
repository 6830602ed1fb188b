"""Next-token cross-entropy over packed rows, computed in chunks of tokens.

The full (tokens x vocab) logits never exist at once: each chunk's logits are computed, reduced
to a weighted loss sum and dropped; ``jax.checkpoint`` recomputes them in the backward pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mmjax.data.batch import IGNORE_INDEX


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
    """Per-token CE and correctness from float32 logits (..., V)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.where(targets == IGNORE_INDEX, 0, targets)
    tgt = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == safe
    return lse - tgt, correct


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Reference (un-chunked): returns (sum of w * CE, sum of w, count of correct supervised tokens)."""
    ce, correct = _token_ce(logits, targets)
    valid = targets != IGNORE_INDEX
    return jnp.sum(ce * weights), jnp.sum(weights), jnp.sum(correct & valid)


def chunked_cross_entropy(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets: jax.Array,
                          weights: jax.Array, chunk_size: int = 1024):
    """Same result as ``cross_entropy(logits_fn(hidden), ...)`` with at most ``chunk_size`` tokens'
    logits alive at a time (forward and backward)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    w = weights.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    chunk_size = min(chunk_size, n)
    pad = (-n) % chunk_size
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, h.shape[1]), h.dtype)])
        t = jnp.concatenate([t, jnp.full((pad,), IGNORE_INDEX, t.dtype)])
        w = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])
    k = h.shape[0] // chunk_size
    h = h.reshape(k, chunk_size, -1)
    t = t.reshape(k, chunk_size)
    w = w.reshape(k, chunk_size)

    @jax.checkpoint
    def chunk(hc, tc, wc):
        ce, correct = _token_ce(logits_fn(hc[None])[0], tc)
        return jnp.sum(ce * wc), jnp.sum(correct & (tc != IGNORE_INDEX))

    def body(carry, xs):
        s, c = chunk(*xs)
        return (carry[0] + s, carry[1] + c), None

    (loss_sum, n_correct), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (h, t, w))
    return loss_sum, jnp.sum(w), n_correct
