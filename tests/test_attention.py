"""Attention backends on packed rows: ``blockwise`` equals ``xla`` (values and gradients), and no
registered backend lets a packed sample see another (a leakage check that catches leaky masks)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmjax.models import attention
from mmjax.models.attention import attention_mask, blockwise_attention, dot_product_attention
from mmjax.models.decoder import CausalLM
from mmjax.models.qwen3 import config_from_hf

B, T, HQ, HKV, D = 3, 45, 4, 2, 8   # T is not a multiple of the block sizes tested
SCALE = 0.3


def packed_rows(t: int = T):
    """Row 0: three samples + tail padding; row 1: one sample over the whole row; row 2: padding only."""
    seg = np.zeros((B, t), np.int32)
    seg[0, :10], seg[0, 10:30], seg[0, 30:40] = 1, 2, 3
    seg[1, :] = 1
    pos = np.zeros((B, t), np.int32)
    for b in range(B):
        for s in np.unique(seg[b]):
            if s:
                idx = np.flatnonzero(seg[b] == s)
                pos[b, idx] = np.arange(len(idx))
    return jnp.asarray(seg), jnp.asarray(pos)


def qkv(seed: int = 0, t: int = T, s: int = T, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, HQ, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, s, HKV, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, s, HKV, D)), dtype)
    ct = jnp.asarray(rng.normal(size=(B, t, HQ, D)), jnp.float32)
    return q, k, v, ct


def assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(np.abs(expected).max(), 1e-6))


def value_and_grads(fn, q, k, v, ct):
    """``fn(q, k, v)`` and the gradients of ``sum(fn(q, k, v) * ct)``, in one jitted call."""

    @jax.jit
    def both(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return both(q, k, v, ct)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block,tile_bytes", [(16, None), (32, None), (16, 4096)])
def test_blockwise_matches_xla_packed(block, causal, tile_bytes):
    """tile_bytes=4096 takes the (row, KV head) pairs two at a time (a group holds heads of one row
    or of two rows); None: all six in one call (one at a time: the uneven-blocks test)."""
    seg, pos = packed_rows()
    q, k, v, ct = qkv()

    def ref(q, k, v):
        return dot_product_attention(q, k, v, attention_mask(seg, None, pos, pos, causal), scale=SCALE)

    def bw(q, k, v):
        return blockwise_attention(q, k, v, seg, None, pos, pos, causal=causal, scale=SCALE,
                                   block_q=block, block_kv=block, tile_bytes=tile_bytes)

    out_r, grads_r = value_and_grads(ref, q, k, v, ct)
    out_b, grads_b = value_and_grads(bw, q, k, v, ct)
    assert_close(out_b, out_r)
    for gb, gr in zip(grads_b, grads_r):
        assert_close(gb, gr)
    # the padding-only row and the padded tail of row 0: zero output, zero (finite) gradients
    np.testing.assert_array_equal(np.asarray(out_b[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(out_b[0, 40:]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads_b[0][2]), 0.0)
    for g in grads_b:
        assert np.all(np.isfinite(np.asarray(g)))


def test_blockwise_uneven_blocks_and_longer_kv():
    """Different query / key block sizes, S != T (queries at the end of a longer key row)."""
    t, s = 21, 45
    seg, pos = packed_rows(s)
    q, k, v, ct = qkv(1, t=t, s=s)
    q_seg, q_pos = seg[:, s - t:], pos[:, s - t:]

    def ref(q, k, v):
        return dot_product_attention(q, k, v, attention_mask(q_seg, seg, q_pos, pos, True), scale=SCALE)

    def bw(q, k, v):
        return blockwise_attention(q, k, v, q_seg, seg, q_pos, pos, causal=True, scale=SCALE,
                                   block_q=8, block_kv=16, tile_bytes=1)  # one pair a call

    out_r, grads_r = value_and_grads(ref, q, k, v, ct)
    out_b, grads_b = value_and_grads(bw, q, k, v, ct)
    assert_close(out_b, out_r)
    for gb, gr in zip(grads_b, grads_r):
        assert_close(gb, gr)


def test_blockwise_without_segments():
    """No segment ids: plain (non-causal) attention over the whole row; default scale."""
    q, k, v, ct = qkv(2)
    out_r, grads_r = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, None), q, k, v, ct)
    out_b, grads_b = value_and_grads(
        lambda q, k, v: blockwise_attention(q, k, v, causal=False, block_q=16, block_kv=32), q, k, v, ct)
    assert_close(out_b, out_r)
    for gb, gr in zip(grads_b, grads_r):
        assert_close(gb, gr)


def test_blockwise_bf16_finite():
    seg, pos = packed_rows()
    q, k, v, ct = qkv(3, dtype=jnp.bfloat16)
    out_r = dot_product_attention(q, k, v, attention_mask(seg, None, pos, pos, True), scale=SCALE)
    fn = lambda q, k, v: blockwise_attention(q, k, v, seg, None, pos, pos, scale=SCALE, block_q=16, block_kv=16)
    out_b, grads_b = value_and_grads(fn, q, k, v, ct)
    assert out_b.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads_b)
    np.testing.assert_allclose(np.asarray(out_b, np.float32), np.asarray(out_r, np.float32), atol=3e-2)
    for g in grads_b:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))


TINY_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=64, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_causal_lm_blockwise_matches_xla(remat):
    # attention_block 16: several query and key blocks per row inside the model
    cfg = dataclasses.replace(config_from_hf(TINY_QWEN3), remat=remat, attention_block=16)
    seg, pos = packed_rows()
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, size=(B, T)), jnp.int32)

    state = nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)))

    def run(attention):
        lm = nnx.eval_shape(lambda: CausalLM(dataclasses.replace(cfg, attention=attention), rngs=nnx.Rngs(0)))
        nnx.update(lm, state)

        def loss(lm):
            logits = lm(ids, segment_ids=seg, positions=pos)
            return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits

        (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(lm)
        return logits, jax.tree.leaves(nnx.to_pure_dict(nnx.state(grads)))

    logits_x, grads_x = run("xla")
    logits_b, grads_b = run("blockwise")
    assert_close(logits_b, logits_x)
    assert len(grads_b) == len(grads_x)
    for gb, gx in zip(grads_b, grads_x):
        assert_close(gb, gx, rtol=1e-4)


def test_blockwise_visits_only_visible_key_blocks():
    """Per query block the key-block range [lo, hi): the causal upper triangle, blocks of earlier
    packed samples and padding-only query blocks are skipped."""
    def ranges(seg):
        seg = np.asarray([seg], np.int32)
        pos = np.zeros_like(seg)
        for s in np.unique(seg):
            pos[seg == s] = np.arange(np.sum(seg == s))
        seg, pos = jnp.asarray(seg), jnp.asarray(pos)
        mode = attention._Mask(causal=True, segmented=True)
        return [tuple(int(x) for x in attention._kv_block_range(seg[:, i:i + 16], pos[:, i:i + 16], seg, pos,
                                                              mode, 16)) for i in range(0, seg.shape[1], 16)]

    assert ranges([1] * 64) == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert ranges([1] * 16 + [2] * 32 + [3] * 16) == [(0, 1), (1, 2), (1, 3), (3, 4)]
    assert ranges([1] * 24 + [0] * 40) == [(0, 1), (0, 2), (0, 0), (0, 0)]


# ---- every registered backend -----------------------------------------------------------------


def _attend(name, q, k, v, seg, pos, block=16):
    backend = attention.get_backend(name)
    return backend.attend(q, k, v, backend.prepare(seg, pos), scale=SCALE, block=block)


@pytest.mark.parametrize("name", sorted(attention.BACKENDS))
def test_every_backend_matches_xla_on_packed_rows(name):
    seg, pos = packed_rows()
    q, k, v, ct = qkv(7)
    ref = value_and_grads(lambda q, k, v: _attend("xla", q, k, v, seg, pos), q, k, v, ct)
    got = value_and_grads(lambda q, k, v: _attend(name, q, k, v, seg, pos), q, k, v, ct)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert_close(a, b)
    assert np.all(np.asarray(got[0])[2] == 0)   # a padding-only row gives zeros


@pytest.mark.parametrize("block", [16, 45, 512])
@pytest.mark.parametrize("name", sorted(attention.BACKENDS))
def test_every_backend_full_attention_matches_softmax(name, block):
    """``attend_full`` (the ViT's bidirectional, unmasked attention over whole tiles): values and
    gradients against a plain float32 softmax, T not a multiple of the block (padded keys must
    not be seen)."""
    q, k, v, ct = qkv(11)

    def plain(q, k, v):
        k, v = jnp.repeat(k, HQ // HKV, axis=2), jnp.repeat(v, HQ // HKV, axis=2)
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * SCALE, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    ref = value_and_grads(plain, q, k, v, ct)
    got = value_and_grads(lambda q, k, v: attention.get_backend(name).attend_full(q, k, v, scale=SCALE, block=block),
                          q, k, v, ct)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert_close(a, b)


def test_balanced_block_pads_less_than_a_token_per_tile():
    for n, block in [(1025, 512), (45, 16), (4096, 512), (7, 512), (1025, 1025)]:
        bq = attention.balanced_block(block, n)
        tiles = -(-n // bq)
        assert bq <= block and tiles == -(-n // min(block, n)) and tiles * bq - n < tiles, (n, block, bq)
    assert attention.balanced_block(512, 1025) == 342


def leaks(attend) -> bool:
    """True when changing the keys / values of one packed sample changes another sample's output
    (or a later token of the same sample changes an earlier one's)."""
    seg, pos = packed_rows()
    q, k, v, _ = qkv(3)
    base = np.asarray(attend(q, k, v, seg, pos))
    k2 = k.at[0, 10:30].add(5.0)        # sample 2 of row 0
    v2 = v.at[0, 10:30].add(5.0)
    v2 = v2.at[1, 40:].add(5.0)         # the last tokens of row 1's only sample
    out = np.asarray(attend(q, k2, v2, seg, pos))
    outside = np.ones(T, bool)
    outside[10:30] = False
    return not (np.array_equal(out[0, outside], base[0, outside]) and np.array_equal(out[1, :40], base[1, :40]))


def test_leakage_check_catches_a_leaky_mask():
    def leaky(q, k, v, seg, pos):   # segment-blind causal mask: attends across packed samples
        t = q.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        return dot_product_attention(q, k, v, jnp.broadcast_to(causal, (q.shape[0], 1, t, t)), scale=SCALE)

    def not_causal(q, k, v, seg, pos):   # segment mask without the causal order
        return dot_product_attention(q, k, v, attention_mask(seg, None, pos, pos, causal=False), scale=SCALE)

    assert leaks(leaky) and leaks(not_causal)


@pytest.mark.parametrize("name", sorted(attention.BACKENDS))
def test_no_backend_leaks_across_packed_samples(name):
    assert not leaks(lambda q, k, v, seg, pos: _attend(name, q, k, v, seg, pos))


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="blockwise"):
        attention.get_backend("flash9")
