"""Building blocks shared by every model family.

Conventions (see docs/architecture.md):
- Every parameter is an ``nnx.Param`` created through :func:`param`, which records its logical
  axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``layers``, ``vit_*`` ...) in the
  ``out_sharding`` metadata. ``mmjax.sharding`` maps those names to mesh axes.
- Dense kernels are stored ``(in, out)`` (JAX convention); the HF <-> mmjax weight tables transpose.
- Fused HF projections (InternLM2 ``wqkv``, Phi-3 ``qkv_proj`` / ``gate_up_proj``, InternViT
  ``attn.qkv``) stay fused here, so every HF tensor maps to exactly one mmjax parameter (or one
  layer slice of a stacked parameter): loading and saving are transposes, never re-packing, and
  LoRA on a fused module means what it means upstream.
- Norms compute in float32 and cast back before the weight multiply (InternLM2 / Llama / InternViT
  semantics). Attention softmax is float32.
- Layers of a stack are created with :func:`stacked` (leading ``layers`` axis) and run with
  :func:`scan_layers` (``jax.lax.scan``), so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any
Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A parameter carrying its logical axis names (no eager sharding: the mesh is applied later)."""
    assert value.ndim == len(axes), (value.shape, axes)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> Axes | None:
    """The logical axis names recorded by :func:`param` (``layers`` first for stacked params)."""
    return variable.get_metadata().get("out_sharding")


def normal_init(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: Dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------------------------
# Linear layers and norms
# --------------------------------------------------------------------------------------------


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``(in, out)``; computes in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(normal_init(rngs, (in_features, out_features), init_std, param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if getattr(self, "lora_a", None) is not None:  # added by mmjax.models.lora.apply_lora
            y = y + _lora_branch(self, x)
        return y


def _lora_branch(dense: Dense, x: jax.Array) -> jax.Array:
    """``scaling * dropout(x) @ lora_a @ lora_b`` (peft semantics: dropout on the LoRA input only).

    Dropout runs only while the layer's ``lora_dropout_on`` flag is set, with the key in
    ``lora_dropout_key``; both are written by :func:`mmjax.models.lora.set_lora_dropout_key`.
    """
    h = x.astype(dense.dtype)
    rate = float(getattr(dense, "lora_dropout", 0.0))
    if rate > 0.0 and getattr(dense, "lora_dropout_key", None) is not None:
        key = jax.random.wrap_key_data(dense.lora_dropout_key[...])
        keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
        dropped = jnp.where(keep, h / jnp.asarray(1.0 - rate, h.dtype), jnp.zeros_like(h))
        h = jnp.where(dense.lora_dropout_on[...], dropped, h)
    z = jnp.dot(jnp.dot(h, dense.lora_a[...].astype(dense.dtype)), dense.lora_b[...].astype(dense.dtype))
    return z * jnp.asarray(dense.lora_scaling, dense.dtype)


class RMSNorm(nnx.Module):
    """``weight * cast(x * rsqrt(mean(x^2) + eps))`` with the statistics in float32."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = "embed",
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias; statistics in float32, output in the input dtype."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = "embed",
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with erf (PyTorch ``nn.GELU()`` / ``ACT2FN['gelu']``), not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding variants found in the supported checkpoints.

    kind: ``default`` | ``linear`` | ``dynamic`` (NTK, InternLM2 / Llama) | ``longrope``
    (Phi-3 ``su`` / ``longrope``: per-dimension short/long factors and an attention factor) |
    ``llama3``.
    """

    head_dim: int
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    rotary_dim: int | None = None  # partial rotary (None = head_dim)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved (rotate-half) RoPE. x: (B, T, H, D); cos/sin: (B, T, Dr), Dr <= D."""
    rd = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return jnp.concatenate([xr * cos + rotate_half(xr) * sin, xp], axis=-1)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def attention_mask(q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   q_positions: jax.Array | None, kv_positions: jax.Array | None,
                   causal: bool) -> jax.Array | None:
    """Boolean mask (B, 1, Tq, Tk): same non-zero segment, and (if causal) kv position <= q position.

    Segment id 0 marks padding (and empty KV-cache slots); positions restart per packed sample,
    so comparing positions inside one segment is the causal order.
    """
    mask = None
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = (q_segment_ids[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    if causal:
        assert q_positions is not None and kv_positions is not None
        c = kv_positions[:, None, :] <= q_positions[:, :, None]
        mask = c if mask is None else mask & c
    return None if mask is None else mask[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          scale: float | None = None) -> jax.Array:
    """Plain XLA attention with grouped KV heads. q: (B,T,Hq,D), k/v: (B,S,Hkv,D) -> (B,T,Hq,D).

    Scores and softmax in float32. Rows with no visible key (padding) produce zeros, not NaN.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        m = mask[:, :, None]  # (B,1,1,T,S)
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        probs = jnp.where(m, probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, hq, d)


# ---- memory-efficient exact attention ("blockwise" backend) ----------------------------------------

BLOCKWISE_BLOCK_SIZE = 512
_MASKED_SCORE = -1e30  # finite "minus infinity" for masked float32 scores (no inf - inf = NaN)


class PackedSegments(NamedTuple):
    """Segment ids (0 = padding) and per-sample positions of a packed batch, (B, T) each.

    Handed to the decoder's attention instead of a dense mask when the backend builds the mask
    itself, block by block (``blockwise``); queries and keys share them (no KV cache)."""

    segment_ids: jax.Array
    positions: jax.Array


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                        q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None, *,
                        causal: bool = True, scale: float | None = None,
                        block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Exact attention over (query block x key block) tiles with an online softmax in float32.

    Same semantics as ``dot_product_attention(q, k, v, attention_mask(q_segment_ids, kv_segment_ids,
    q_positions, kv_positions, causal), scale)``: q (B,T,Hq,D), k/v (B,S,Hkv,D) with Hq a multiple of
    Hkv (grouped KV heads), a key is visible when it has the query's non-zero segment id and (if
    causal) ``kv_position <= q_position``; queries with no visible key (padding) give zeros.
    ``q_segment_ids=None`` means no segment mask; ``kv_segment_ids=None`` reuses the query's;
    positions default to ``arange``.

    Memory is O(B * H * T * block) instead of O(B * H * T * S): the forward keeps a running max,
    running sum and float32 accumulator per query block, and a ``jax.custom_vjp`` backward recomputes
    the scores tile by tile from the saved log-sum-exp (flash-attention style: nothing of size T x S
    is stored for the backward). Per query block only the contiguous range of key blocks that holds a
    visible key is visited (causal upper-triangle blocks and blocks of other packed samples are
    skipped); T and S need not be multiples of the block sizes (padded internally). Block sizes
    default to the module's ``BLOCKWISE_BLOCK_SIZE`` (read at call time) and shrink to T / S when
    those are shorter.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads not a multiple of {hkv} kv heads")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} disagree")
    scale = d ** -0.5 if scale is None else float(scale)
    if q_segment_ids is None:
        q_seg, kv_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
    else:
        q_seg = q_segment_ids
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if q_positions is None else q_positions
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if kv_positions is None else kv_positions
    block_q = BLOCKWISE_BLOCK_SIZE if block_q is None else block_q
    block_kv = BLOCKWISE_BLOCK_SIZE if block_kv is None else block_kv
    bq, bk = max(1, min(int(block_q), t)), max(1, min(int(block_kv), s))
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk

    def pad(x, n):  # pad axis 1 to n with zeros (segment 0 = padding: never attended, zero output)
        return x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    out = _blockwise_core(bool(causal), scale, bq, bk, pad(q, tp), pad(k, sp), pad(v, sp),
                          pad(q_seg.astype(jnp.int32), tp), pad(kv_seg.astype(jnp.int32), sp),
                          pad(q_pos.astype(jnp.int32), tp), pad(kv_pos.astype(jnp.int32), sp))
    return out[:, :t]


def _tile_mask(qs, qp, ks, kp, causal):
    """(B, bq) query and (B, bk) key segment ids / positions -> (B, 1, 1, bq, bk) visibility."""
    m = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
    if causal:
        m = m & (kp[:, None, :] <= qp[:, :, None])
    return m[:, None, None]


def _kv_block_range(qs, qp, ks, kp, causal, bk):
    """[lo, hi) key-block range holding every key visible from a query block (empty: lo = hi = 0)."""
    m = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)  # (B, bq, S); reduced right away
    if causal:
        m = m & (kp[:, None, :] <= qp[:, :, None])
    nk = ks.shape[1] // bk
    vis = jnp.any(m.reshape(m.shape[0], m.shape[1], nk, bk), axis=(0, 1, 3))  # (nk,)
    lo = jnp.argmax(vis).astype(jnp.int32)
    hi = (nk - jnp.argmax(vis[::-1])).astype(jnp.int32)
    anyv = jnp.any(vis)
    return jnp.where(anyv, lo, 0), jnp.where(anyv, hi, 0)


def _q_blocks(x, bq):
    """(B, Tp, ...) -> (nq, B, bq, ...): query blocks on a leading axis for ``lax.scan``."""
    n = x.shape[1] // bq
    x = x.reshape((x.shape[0], n, bq) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_q_blocks(x):
    """(nq, B, bq, ...) -> (B, nq * bq, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _score_tile(qi, qs, qp, k, v, kv_seg, kv_pos, start, bk, causal, scale):
    """Key block ``[start, start + bk)`` against query block ``qi``: the block's keys and values,
    its visibility mask and its masked float32 scores (B, Hkv, G, bq, bk); shared by the forward
    pass and the recomputing backward pass."""
    kj = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=1)
    vj = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=1)
    ks = jax.lax.dynamic_slice_in_dim(kv_seg, start, bk, axis=1)
    kp = jax.lax.dynamic_slice_in_dim(kv_pos, start, bk, axis=1)
    msk = _tile_mask(qs, qp, ks, kp, causal)
    sc = jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale
    return kj, vj, msk, jnp.where(msk, sc, _MASKED_SCORE)


def _blockwise_forward(causal, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    f32 = jnp.float32

    def q_block(_, xs):
        qi, qs, qp = xs  # (B,bq,Hkv,G,D), (B,bq), (B,bq)
        lo, hi = _kv_block_range(qs, qp, kv_seg, kv_pos, causal, bk)

        def kv_step(j, carry):
            m, l, acc = carry
            kj, vj, msk, sc = _score_tile(qi, qs, qp, k, v, kv_seg, kv_pos, j * bk, bk, causal, scale)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            p = jnp.where(msk, jnp.exp(sc - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), vj, preferred_element_type=f32)
            return m_new, l, acc * alpha[..., None] + pv

        init = (jnp.full((b, hkv, g, bq), _MASKED_SCORE, f32), jnp.zeros((b, hkv, g, bq), f32),
                jnp.zeros((b, hkv, g, bq, d), f32))
        m, l, acc = jax.lax.fori_loop(lo, hi, kv_step, init)
        seen = l > 0  # a row with a visible key has l >= 1 (its max term is exp(0))
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return None, (jnp.einsum("bhgqd->bqhgd", o).astype(q.dtype), lse, lo, hi)

    qb = _q_blocks(q.reshape(b, tp, hkv, g, d), bq)
    _, (o, lse, lo, hi) = jax.lax.scan(q_block, None, (qb, _q_blocks(q_seg, bq), _q_blocks(q_pos, bq)))
    return _from_q_blocks(o).reshape(b, tp, hq, d), (lse, lo, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _blockwise_core(causal, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    return _blockwise_forward(causal, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos)[0]


def _blockwise_core_fwd(causal, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    o, (lse, lo, hi) = _blockwise_forward(causal, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos)
    return o, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, o, lse, lo, hi)


def _blockwise_core_bwd(causal, scale, bq, bk, res, do):
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, o, lse, lo, hi = res
    b, tp, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    f32 = jnp.float32
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij (the softmax backward's row term)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1).reshape(b, tp, hkv, g)
    delta = jnp.einsum("bthg->bhgt", delta)  # (B,Hkv,G,Tp)

    def q_block(carry, xs):
        dk_acc, dv_acc = carry
        qi, doi, qs, qp, lse_i, delta_i, lo_i, hi_i = xs

        def kv_step(j, c):
            dq_i, dk_acc, dv_acc = c
            start = j * bk
            kj, vj, msk, sc = _score_tile(qi, qs, qp, k, v, kv_seg, kv_pos, start, bk, causal, scale)
            p = jnp.where(msk, jnp.exp(sc - lse_i[..., None]), 0.0)  # (B,Hkv,G,bq,bk)
            dv_j = jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do.dtype), doi, preferred_element_type=f32)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", doi, vj, preferred_element_type=f32)
            ds = p * (dp - delta_i[..., None])
            dq_i = dq_i + jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), kj,
                                     preferred_element_type=f32) * scale
            dk_j = jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), qi, preferred_element_type=f32) * scale
            dk_acc = jax.lax.dynamic_update_slice_in_dim(
                dk_acc, jax.lax.dynamic_slice_in_dim(dk_acc, start, bk, axis=1) + dk_j, start, axis=1)
            dv_acc = jax.lax.dynamic_update_slice_in_dim(
                dv_acc, jax.lax.dynamic_slice_in_dim(dv_acc, start, bk, axis=1) + dv_j, start, axis=1)
            return dq_i, dk_acc, dv_acc

        init = (jnp.zeros((b, bq, hkv, g, d), f32), dk_acc, dv_acc)
        dq_i, dk_acc, dv_acc = jax.lax.fori_loop(lo_i, hi_i, kv_step, init)
        return (dk_acc, dv_acc), dq_i.astype(q.dtype)

    sp = k.shape[1]
    zeros_kv = jnp.zeros((b, sp, hkv, d), f32)
    xs = (_q_blocks(q.reshape(b, tp, hkv, g, d), bq), _q_blocks(do.reshape(b, tp, hkv, g, d), bq),
          _q_blocks(q_seg, bq), _q_blocks(q_pos, bq),
          lse, jnp.moveaxis(delta.reshape(b, hkv, g, tp // bq, bq), 3, 0), lo, hi)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros_kv, zeros_kv), xs)
    dq = _from_q_blocks(dq).reshape(b, tp, hq, d)
    return (dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


# --------------------------------------------------------------------------------------------
# Stacked, scanned layers
# --------------------------------------------------------------------------------------------


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` copies of a layer with every parameter stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs):
        return make_layer(r)

    return create(rngs)


REMAT_POLICIES = {
    "none": None,  # no rematerialization: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
}


def scan_layers(layers: nnx.Module, fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
                xs: Any = None, remat: str = "none") -> tuple[Any, Any]:
    """Run ``fn(layer, carry, x) -> (carry, y)`` over a :func:`stacked` module with ``lax.scan``.

    ``xs`` / the returned ``ys`` carry per-layer inputs and outputs (KV-cache slices, hidden states,
    DropPath keys). ``remat`` names a policy in :data:`REMAT_POLICIES`.
    """
    graphdef, state = nnx.split(layers)

    def body(c, layer_and_x):
        layer_state, x = layer_and_x
        return fn(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))


def num_layers_of(layers: nnx.Module) -> int:
    leaves = jax.tree.leaves(nnx.state(layers))
    return int(leaves[0].shape[0])


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions 0..n-1 over the real tokens of each row (left or right padding); 0 on padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


# --------------------------------------------------------------------------------------------
# Rotary tables (every RopeConfig kind) and the functional KV cache
# --------------------------------------------------------------------------------------------


def segment_max_positions(positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """For every token, the largest position inside its segment (B, T).

    Length-dependent rotary variants use ``seq_len = segment max position + 1`` so a packed row
    computes what each sample computes alone. Segment ids are expected in ``[0, T]``.
    """
    if segment_ids is None:
        return jnp.broadcast_to(jnp.max(positions, axis=-1, keepdims=True), positions.shape)
    t = positions.shape[-1]

    def row(p, s):
        s = jnp.clip(s, 0, t)
        return jax.ops.segment_max(p, s, num_segments=t + 1)[s]

    return jax.vmap(row)(positions.astype(jnp.int32), segment_ids.astype(jnp.int32))


def rope_inv_freq(rope: RopeConfig) -> np.ndarray:
    """Base inverse frequencies (Dr/2,) float32 of the ``default`` / ``linear`` / ``llama3`` kinds."""
    dim = rope.rotary_dim or rope.head_dim
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(rope.theta) ** exps)).astype(np.float32)
    if rope.kind == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.kind == "llama3":
        old = float(rope.original_max_position_embeddings or rope.max_position_embeddings)
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (old / wl - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(rope: RopeConfig, positions: jax.Array, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (B, T, Dr) in float32 for ``positions`` (B, T).

    ``longrope`` (Phi-3 su): long factors for tokens whose segment is longer than
    ``original_max_position_embeddings``, short factors otherwise; the attention factor multiplies
    cos/sin in both regimes. ``dynamic`` (NTK): the base grows with the segment length once it
    exceeds ``max_position_embeddings``. Both tables are computed and selected with ``jnp.where``
    per token (no Python branch on traced values).
    """
    dim = rope.rotary_dim or rope.head_dim
    pos = positions.astype(jnp.float32)
    scale = 1.0
    if rope.kind in ("default", "linear", "llama3"):
        inv = jnp.asarray(rope_inv_freq(rope))
        freqs = pos[..., None] * inv
    elif rope.kind == "longrope":
        exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        base = np.float32(rope.theta) ** exps
        short = np.float32(1.0) / (np.asarray(rope.short_factor, np.float32) * base)
        long = np.float32(1.0) / (np.asarray(rope.long_factor, np.float32) * base)
        seq_len = segment_max_positions(positions, segment_ids) + 1
        use_long = (seq_len > rope.original_max_position_embeddings)[..., None]
        freqs = jnp.where(use_long, pos[..., None] * jnp.asarray(long), pos[..., None] * jnp.asarray(short))
        scale = 1.0 if rope.attention_factor is None else rope.attention_factor
    elif rope.kind == "dynamic":
        exps = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
        seq_len = (segment_max_positions(positions, segment_ids) + 1).astype(jnp.float32)
        mpe = float(rope.max_position_embeddings)
        grown = (rope.factor * seq_len / mpe) - (rope.factor - 1.0)
        base = jnp.where(seq_len > mpe,
                         rope.theta * jnp.maximum(grown, 1.0) ** (dim / (dim - 2)),
                         jnp.float32(rope.theta))
        inv = 1.0 / (base[..., None] ** exps)
        freqs = pos[..., None] * inv
    else:
        raise ValueError(f"unsupported rope kind {rope.kind!r}")
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


class KVCache(NamedTuple):
    """Functional decoder KV cache (a pytree, so a decode step jit-compiles once per shape).

    k, v: (L, B, S, Hkv, D); segment_ids: (B, S), 0 = empty slot; positions: (B, S);
    index: () int32, the next slot written (shared by the batch rows).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array


def init_kv_cache(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype: Dtype = jnp.float32) -> KVCache:
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   positions=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def cache_write(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write ``new`` (B, T, ...) into ``buf`` (B, S, ...) at slot ``index`` along axis 1."""
    start = (jnp.zeros((), jnp.int32), index.astype(jnp.int32)) + (jnp.zeros((), jnp.int32),) * (buf.ndim - 2)
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)
