"""Greedy / sampled generation from embeddings with the KV cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.models import generation
from mmjax.models.generation import generate, sample_logits
from tests import hf_fixtures as F
from tests.test_decoders import load, tokens

NEW = 6


@functools.partial(jax.jit, static_argnums=0)
def _full(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)


def greedy_by_full_forward(lm, prompts):
    """Reference: left-pad every prompt, run the full forward, append argmax, repeat."""
    t = max(len(p) for p in prompts) + NEW
    seqs = [list(p) for p in prompts]
    graphdef, state = nnx.split(lm)
    for _ in range(NEW):
        ids = np.zeros((len(seqs), t), np.int32)
        mask = np.zeros((len(seqs), t), np.int32)
        for r, s in enumerate(seqs):
            ids[r, t - len(s):], mask[r, t - len(s):] = s, 1
        logits = np.asarray(_full(graphdef, state, ids, mask))
        for r, s in enumerate(seqs):
            s.append(int(logits[r, -1].argmax()))
    return np.array([s[len(p):] for s, p in zip(seqs, prompts)])


def left_padded(lm, prompts):
    t = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), t), np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for r, p in enumerate(prompts):
        ids[r, t - len(p):], mask[r, t - len(p):] = p, 1
    return lm.embed(jnp.asarray(ids)), jnp.asarray(mask)


@pytest.mark.parametrize("name", ["qwen3", "internlm2"])
def test_greedy_generate_equals_repeated_full_forward(name):
    lm = load(name)
    prompts = [tokens(9, 21), tokens(5, 22)]            # row 1 is left-padded by 4
    expect = greedy_by_full_forward(lm, prompts)
    embeds, mask = left_padded(lm, prompts)
    ids, lengths = generate(lm, embeds, mask, max_new_tokens=NEW, eos_token_ids=())
    np.testing.assert_array_equal(np.asarray(ids), expect)
    np.testing.assert_array_equal(np.asarray(lengths), [NEW, NEW])

    # EOS: stop row 0 at the first occurrence of its 3rd token; the slots after it hold padding
    eos = int(expect[0, 2])
    first = int(np.argmax(expect[0] == eos))
    ids, lengths = generate(lm, embeds, mask, max_new_tokens=NEW, eos_token_ids=[eos], pad_token_id=0)
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    assert lengths[0] == first + 1
    np.testing.assert_array_equal(ids[0, :first + 1], expect[0, :first + 1])
    assert (ids[0, first + 1:] == 0).all()
    hit = np.flatnonzero(expect[1] == eos)
    assert lengths[1] == (hit[0] + 1 if hit.size else NEW)


def test_generate_compiles_once_per_shape():
    lm = load("qwen3")
    embeds, mask = left_padded(lm, [tokens(9, 23), tokens(5, 24)])
    generation._generate.clear_cache()
    a, _ = generate(lm, embeds, mask, max_new_tokens=NEW, eos_token_ids=2)
    b, _ = generate(lm, embeds * 1.0, mask, max_new_tokens=NEW, eos_token_ids=5)   # new values, same shapes
    assert generation._generate._cache_size() == 1
    generate(lm, embeds, mask, max_new_tokens=NEW + 1, eos_token_ids=2)
    assert generation._generate._cache_size() == 2                                 # a new cache size compiles
    np.testing.assert_array_equal(np.asarray(a)[:, 0], np.asarray(b)[:, 0])


def test_sampling_filters():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(64, F.VOCAB)).astype(np.float32) * 3)
    greedy = np.asarray(sample_logits(logits, None))
    key = jax.random.key(1)
    np.testing.assert_array_equal(sample_logits(logits, key, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample_logits(logits, key, temperature=1.0, top_p=1e-6), greedy)
    # top-k 3: every sample is among the 3 largest logits, and not always the largest
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    draws = np.stack([np.asarray(sample_logits(logits, jax.random.key(s), temperature=2.0, top_k=3))
                      for s in range(8)])
    assert all((draws[:, r:r + 1] == top3[r]).any(-1).all() for r in range(64))
    assert (draws != greedy).any()
    # sampled generate: reproducible for one key, tokens in range
    lm = load("qwen3")
    embeds, mask = left_padded(lm, [tokens(9, 25), tokens(5, 26)])
    x, _ = generate(lm, embeds, mask, max_new_tokens=NEW, temperature=1.0, top_p=0.9, rng=jax.random.key(3))
    y, _ = generate(lm, embeds, mask, max_new_tokens=NEW, temperature=1.0, top_p=0.9, rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ((np.asarray(x) >= 0) & (np.asarray(x) < F.VOCAB)).all()
    with pytest.raises(ValueError, match="rng"):
        generate(lm, embeds, mask, max_new_tokens=NEW, temperature=1.0)
