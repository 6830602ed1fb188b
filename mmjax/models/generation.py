"""Autoregressive generation from embeddings with the functional KV cache.

Starting from embeddings (not ids) lets the InternVL composition prefill with image features
scattered into the prompt. The cache has a static size (prompt length + ``max_new_tokens``), so one
(batch, prompt length, max_new_tokens) shape compiles once. Left- or right-padded prompts work:
padding slots carry segment id 0 and are never attended; new tokens continue each row's positions.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.layers import positions_from_mask


def sample_logits(logits: jax.Array, rng: jax.Array | None, *, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0) -> jax.Array:
    """Next token ids (B,) from float32 logits (B, V): greedy when ``temperature == 0``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs        # mass strictly above each token
        sorted_logits = jnp.where(before > top_p, neg, sorted_logits)   # the top token always stays
        inverse = jnp.argsort(order, axis=-1)
        logits = jnp.take_along_axis(sorted_logits, inverse, axis=-1)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "top_k"))
def _generate(graphdef, state, prefill_embeds, prefill_mask, prefill_image_mask, rng, eos, pad_token_id, *,
              max_new_tokens, temperature, top_p, top_k):
    lm = nnx.merge(graphdef, state)
    b, t = prefill_mask.shape
    mask = prefill_mask.astype(jnp.int32)
    positions = positions_from_mask(mask)
    cache = lm.init_cache(b, t + max_new_tokens)
    hidden, cache = lm.decode_embeds(prefill_embeds, mask, positions, cache, image_mask=prefill_image_mask)
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)            # last real prompt token (any padding side)
    logits = lm.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]
    next_pos = jnp.sum(mask, axis=-1).astype(jnp.int32)          # positions continue per row

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, logits, done, tokens, lengths, pos, rng = carry
        rng, sub = jax.random.split(rng)
        tok = sample_logits(logits, sub, temperature=temperature, top_p=top_p, top_k=top_k)
        tok = jnp.where(done, pad_token_id, tok)
        tokens = tokens.at[:, i].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
        h, cache = lm.decode_embeds(lm.embed(tok[:, None]), jnp.ones((b, 1), jnp.int32), pos[:, None], cache)
        return i + 1, cache, lm.logits(h)[:, 0], done, tokens, lengths, pos + 1, rng

    carry = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((b,), bool),
             jnp.full((b, max_new_tokens), pad_token_id, jnp.int32), jnp.zeros((b,), jnp.int32), next_pos, rng)
    _, _, _, _, tokens, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths


def generate(lm, prefill_embeds: jax.Array, prefill_mask: jax.Array, *, max_new_tokens: int,
             eos_token_ids: int | Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, rng: jax.Array | None = None, pad_token_id: int = 0,
             prefill_image_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Generate up to ``max_new_tokens`` after the prompt ``prefill_embeds`` (B, T, H) whose real
    tokens are ``prefill_mask == 1`` (left or right padding). ``prefill_image_mask`` (B, T) marks
    the prompt's image tokens for a partial-LoRA decoder (XComposer2); generated tokens are text.

    Returns ``(ids (B, max_new_tokens) int32, lengths (B,))``: ``lengths`` counts the generated
    tokens of each row including its EOS; slots after it hold ``pad_token_id``. Greedy when
    ``temperature == 0``; otherwise top-k (0 = off) then nucleus top-p filtering and sampling with ``rng``.
    """
    if isinstance(eos_token_ids, int):
        eos_token_ids = (eos_token_ids,)
    eos_token_ids = tuple(int(e) for e in eos_token_ids) or (-1,)
    if rng is None:
        if temperature != 0.0:
            raise ValueError("sampling (temperature > 0) needs an rng key")
        rng = jax.random.key(0)
    graphdef, state = nnx.split(lm)
    eos = jnp.asarray(eos_token_ids, jnp.int32)
    return _generate(graphdef, state, prefill_embeds, prefill_mask, prefill_image_mask, rng, eos,
                     jnp.asarray(pad_token_id, jnp.int32),
                     max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                     top_k=int(top_k))
