"""Segment-aware attention for packed rows, and the one registry of attention backends.

A packed row carries ``segment_ids`` (0 = padding) and ``positions`` (restarting per sample): a
query sees a key when both share a non-zero segment id and, causally, the key's position is not
after the query's. Every backend computes exactly that; they differ in memory and speed:

- ``xla``: dense float32 ``(B, H, T, S)`` scores under a boolean mask (the reference; also the
  KV-cache path of generation, whose queries are few or whose rows are short).
- ``blockwise``: exact tiled attention with an online softmax and a recomputing backward pass,
  ``O(T * block)`` memory, key blocks without a visible key skipped.
- ``pallas_gpu`` / ``splash``: JAX's own Pallas kernels (Triton flash attention on GPUs, splash
  attention on TPUs), given the packed rows' segment ids; interpret mode on CPU.

A backend is a :class:`Backend` in :data:`BACKENDS`: ``prepare(segment_ids, positions)`` builds
what the layers share (once per forward pass, outside the layer scan) and ``attend(q, k, v,
prepared, scale=, block=)`` runs one layer's causal attention; ``attend_full(q, k, v, scale=,
block=)`` is the bidirectional, unmasked attention of the ViT over its tiles. Backends for
accelerator kernels register here too, so the model code never names one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


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
    Computed head-major (one batched matmul per KV head group, no per-product transposes) and
    normalized after the value product (``(exp(s - max) @ v) / sum``: one pass less over the
    (T, S) scores than softmax-then-matmul; the shift is a constant of the softmax, so its
    gradient is zero and it is taken out of the graph).
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qh = jnp.moveaxis(q.reshape(b, t, hkv, g, d), 1, 3).reshape(b, hkv, g * t, d)
    kh, vh = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32).reshape(b, hkv, g, t, s)
    scores = scores * scale
    if mask is not None:
        m = mask[:, :, None]  # (B,1,1,T,S)
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    if mask is not None:
        e = jnp.where(m, e, 0.0)
    denom = jnp.sum(e, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", e.reshape(b, hkv, g * t, s).astype(v.dtype), vh,
                     preferred_element_type=jnp.float32).reshape(b, hkv, g, t, d)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, hq, d).astype(q.dtype)


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
                        block_q: int | None = None, block_kv: int | None = None,
                        tile_bytes: int | None | str = "default") -> jax.Array:
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
    skipped). Block sizes default to the module's ``BLOCKWISE_BLOCK_SIZE`` (read at call time) and
    are upper bounds: T (S) is split into as many equal tiles as the block needs
    (:func:`balanced_block`), padded internally by less than one token per tile. ``tile_bytes``
    bounds the float32 scores one kernel call holds per tile step: (row, KV head) pairs are then
    taken a group at a time (:func:`default_tile_bytes`: cache-sized on CPU; ``None``: all at once).
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    tile_bytes = default_tile_bytes() if tile_bytes == "default" else tile_bytes
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
    bq, bk = balanced_block(block_q, t), balanced_block(block_kv, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk

    def pad(x, n):  # pad axis 1 to n with zeros (segment 0 = padding: never attended, zero output)
        return x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    # head-major inside the kernel: (B, Hkv, G, T, D) queries, (B, Hkv, S, D) keys / values, so every
    # tile product is a plain batched matmul over (B, Hkv) with no per-tile transposes
    g = hq // hkv
    qh = jnp.moveaxis(pad(q, tp).reshape(b, tp, hkv, g, d), 1, 3)
    kh, vh = jnp.moveaxis(pad(k, sp), 1, 2), jnp.moveaxis(pad(v, sp), 1, 2)
    mode = _Mask(causal=bool(causal), segmented=q_segment_ids is not None)
    ids = (pad(q_seg.astype(jnp.int32), tp), pad(kv_seg.astype(jnp.int32), sp),
           pad(q_pos.astype(jnp.int32), tp), pad(kv_pos.astype(jnp.int32), sp))
    c = _rows_per_call(b * hkv, g * bq * bk * 4, tile_bytes)
    if c == b * hkv:
        out = _blockwise_core(mode, scale, bq, bk, qh, kh, vh, *ids)
    else:
        # (row, KV head) pairs in groups of c, one group per iteration, each group a batch of its own
        # with one KV head: the group's score tiles stay in cache between the products and the
        # softmax (measured on a 2-core CPU, fwd+bwd, 8 heads / 4 KV heads, d 64: 1 x 4096 causal
        # 1.62 -> 1.39 s, 4 x 1024 0.52 -> 0.44 s; all pairs at once write every tile to memory)
        n = b * hkv
        heads = lambda x: x.reshape((n // c, c, 1) + x.shape[2:])                 # (B, Hkv, ...)
        rows = lambda x: jnp.repeat(x, hkv, axis=0).reshape((n // c, c) + x.shape[1:])  # (B, T): per pair
        xs = (heads(qh), heads(kh), heads(vh)) + tuple(rows(i) for i in ids)
        out = jax.lax.map(lambda a: _blockwise_core(mode, scale, bq, bk, *a), xs).reshape(qh.shape)
    return jnp.moveaxis(out, 3, 1).reshape(b, tp, hq, d)[:, :t]


def _rows_per_call(n: int, tile_bytes_per_pair: int, budget: int | None) -> int:
    """How many of the ``n`` (row, KV head) pairs one kernel call takes: the largest divisor of n
    whose float32 score tiles fit ``budget`` bytes (at least one pair; all of them without a budget)."""
    if budget is None:
        return n
    fit = max(1, budget // max(1, tile_bytes_per_pair))
    return max(c for c in range(1, min(n, fit) + 1) if n % c == 0)


def default_tile_bytes() -> int | None:
    """The score-tile budget of one blockwise call on the default backend: on CPU about one core's
    L2 cache (the tiles are reread by the softmax and the value product), elsewhere none (an
    accelerator wants every head in one kernel launch)."""
    return 1 << 19 if jax.default_backend() == "cpu" else None


def balanced_block(block: int, n: int) -> int:
    """The tile for ``n`` tokens: as many tiles as ``block`` needs, made equal, so padding stays
    below one token per tile (a 1,025-token ViT tile with block 512 gets three tiles of 342, not
    three of 512 with a third of the work on padding)."""
    block = max(1, min(int(block), n))
    return -(-n // -(-n // block))


class _Mask(NamedTuple):
    """What a tile's visibility depends on (static): causal order, and segment ids (packed rows);
    without segments only the kernel's own key padding (segment 0) is masked, as one key vector."""

    causal: bool
    segmented: bool


def _visible(qs, qp, ks, kp, mode: _Mask):
    """(B, bq) query and (B, n) key segment ids / positions -> visibility, (B, bq, n) or, with
    neither segments nor causality, the (B, 1, n) key mask that broadcasts over the queries."""
    m = ks[:, None, :] != 0
    if mode.segmented:
        m = m & (qs[:, :, None] == ks[:, None, :])
    if mode.causal:
        m = m & (kp[:, None, :] <= qp[:, :, None])
    return m


def _tile_mask(qs, qp, ks, kp, mode: _Mask):
    """(B, 1, 1, bq | 1, bk) visibility of a tile."""
    return _visible(qs, qp, ks, kp, mode)[:, None, None]


def _kv_block_range(qs, qp, ks, kp, mode: _Mask, bk):
    """[lo, hi) key-block range holding every key visible from a query block (empty: lo = hi = 0)."""
    nk = ks.shape[1] // bk
    if not (mode.segmented or mode.causal):   # every block holds real keys: the padding is < one block
        return jnp.zeros((), jnp.int32), jnp.asarray(nk, jnp.int32)
    m = _visible(qs, qp, ks, kp, mode)  # (B, bq, S); reduced right away
    vis = jnp.any(m.reshape(m.shape[0], m.shape[1], nk, bk), axis=(0, 1, 3))  # (nk,)
    lo = jnp.argmax(vis).astype(jnp.int32)
    hi = (nk - jnp.argmax(vis[::-1])).astype(jnp.int32)
    anyv = jnp.any(vis)
    return jnp.where(anyv, lo, 0), jnp.where(anyv, hi, 0)


def _blocks(x, axis, size):
    """Split ``axis`` into blocks of ``size`` on a new leading axis (for ``lax.scan``)."""
    n = x.shape[axis] // size
    x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis):
    """Inverse of :func:`_blocks`: the leading block axis merged back into ``axis``."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _score_tile(qi, qs, qp, k, v, kv_seg, kv_pos, start, bk, mode, scale):
    """Key block ``[start, start + bk)`` against query block ``qi`` (B, Hkv, G, bq, D): the block's
    keys and values (B, Hkv, bk, D), its visibility mask and its masked float32 scores
    (B, Hkv, G, bq, bk); shared by the forward pass and the recomputing backward pass."""
    b, h, g, bq, d = qi.shape
    kj = jax.lax.dynamic_slice_in_dim(k, start, bk, axis=2)
    vj = jax.lax.dynamic_slice_in_dim(v, start, bk, axis=2)
    ks = jax.lax.dynamic_slice_in_dim(kv_seg, start, bk, axis=1)
    kp = jax.lax.dynamic_slice_in_dim(kv_pos, start, bk, axis=1)
    msk = _tile_mask(qs, qp, ks, kp, mode)
    # the G query heads of a KV head share its keys: one (G * bq, D) x (D, bk) product
    sc = jnp.einsum("bhqd,bhkd->bhqk", qi.reshape(b, h, g * bq, d), kj,
                    preferred_element_type=jnp.float32).reshape(b, h, g, bq, bk) * scale
    return kj, vj, msk, jnp.where(msk, sc, _MASKED_SCORE)


def _rows_times(p, x):
    """(B, Hkv, G, bq, bk) x (B, Hkv, bk, D) -> (B, Hkv, G, bq, D) float32, as one matmul per (B, Hkv)."""
    b, h, g, bq, bk = p.shape
    return jnp.einsum("bhqk,bhkd->bhqd", p.reshape(b, h, g * bq, bk), x,
                      preferred_element_type=jnp.float32).reshape(b, h, g, bq, x.shape[-1])


def _blockwise_forward(mode, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    b, hkv, g, tp, d = q.shape
    f32 = jnp.float32

    def q_block(_, xs):
        qi, qs, qp = xs  # (B,Hkv,G,bq,D), (B,bq), (B,bq)
        lo, hi = _kv_block_range(qs, qp, kv_seg, kv_pos, mode, bk)

        def kv_step(j, carry):
            m, l, acc = carry
            kj, vj, msk, sc = _score_tile(qi, qs, qp, k, v, kv_seg, kv_pos, j * bk, bk, mode, scale)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            p = jnp.where(msk, jnp.exp(sc - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + jnp.sum(p, axis=-1)
            return m_new, l, acc * alpha[..., None] + _rows_times(p.astype(v.dtype), vj)

        init = (jnp.full((b, hkv, g, bq), _MASKED_SCORE, f32), jnp.zeros((b, hkv, g, bq), f32),
                jnp.zeros((b, hkv, g, bq, d), f32))
        m, l, acc = jax.lax.fori_loop(lo, hi, kv_step, init)
        seen = l > 0  # a row with a visible key has l >= 1 (its max term is exp(0))
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return None, (o.astype(q.dtype), lse, lo, hi)

    xs = (_blocks(q, 3, bq), _blocks(q_seg, 1, bq), _blocks(q_pos, 1, bq))
    _, (o, lse, lo, hi) = jax.lax.scan(q_block, None, xs)
    return _unblocks(o, 3), (lse, lo, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _blockwise_core(mode, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    return _blockwise_forward(mode, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos)[0]


def _blockwise_core_fwd(mode, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
    o, (lse, lo, hi) = _blockwise_forward(mode, scale, bq, bk, q, k, v, q_seg, kv_seg, q_pos, kv_pos)
    return o, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, o, lse, lo, hi)


def _blockwise_core_bwd(mode, scale, bq, bk, res, do):
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, o, lse, lo, hi = res
    b, hkv, g, tp, d = q.shape
    f32 = jnp.float32
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij (the softmax backward's row term)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)   # (B,Hkv,G,Tp)
    # computed once, here: XLA:CPU otherwise fuses this reduction into the dS product's consumer
    # and recomputes it for every score (measured: the ViT's dS fusion took 0.5 s a layer, not ~0.05)
    delta = jax.lax.optimization_barrier(delta)

    def q_block(carry, xs):
        dk_acc, dv_acc = carry
        qi, doi, qs, qp, lse_i, delta_i, lo_i, hi_i = xs
        bsz, h, gg, bqq, dd = qi.shape
        q2, do2 = qi.reshape(bsz, h, gg * bqq, dd), doi.reshape(bsz, h, gg * bqq, dd)

        def kv_step(j, c):
            dq_i, dk_acc, dv_acc = c
            start = j * bk
            kj, vj, msk, sc = _score_tile(qi, qs, qp, k, v, kv_seg, kv_pos, start, bk, mode, scale)
            p = jnp.where(msk, jnp.exp(sc - lse_i[..., None]), 0.0)  # (B,Hkv,G,bq,bk)
            p2 = p.reshape(bsz, h, gg * bqq, bk)
            dv_j = jnp.einsum("bhqk,bhqd->bhkd", p2.astype(do.dtype), do2, preferred_element_type=f32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", do2, vj, preferred_element_type=f32).reshape(p.shape)
            ds = (p * (dp - delta_i[..., None])).reshape(p2.shape)
            dq_i = dq_i + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), kj, preferred_element_type=f32) * scale
            dk_j = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), q2, preferred_element_type=f32) * scale
            dk_acc = jax.lax.dynamic_update_slice_in_dim(
                dk_acc, jax.lax.dynamic_slice_in_dim(dk_acc, start, bk, axis=2) + dk_j, start, axis=2)
            dv_acc = jax.lax.dynamic_update_slice_in_dim(
                dv_acc, jax.lax.dynamic_slice_in_dim(dv_acc, start, bk, axis=2) + dv_j, start, axis=2)
            return dq_i, dk_acc, dv_acc

        init = (jnp.zeros((bsz, h, gg * bqq, dd), f32), dk_acc, dv_acc)
        dq_i, dk_acc, dv_acc = jax.lax.fori_loop(lo_i, hi_i, kv_step, init)
        return (dk_acc, dv_acc), dq_i.reshape(qi.shape).astype(q.dtype)

    sp = k.shape[2]
    zeros_kv = jnp.zeros((b, hkv, sp, d), f32)
    xs = (_blocks(q, 3, bq), _blocks(do, 3, bq), _blocks(q_seg, 1, bq), _blocks(q_pos, 1, bq),
          lse, _blocks(delta, 3, bq), lo, hi)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros_kv, zeros_kv), xs)
    return (_unblocks(dq, 3), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


# ---- the registry ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    """One attention implementation for the decoder's full (cache-free) forward pass.

    ``prepare(segment_ids, positions) -> prepared`` runs once per forward pass;
    ``attend(q, k, v, prepared, *, scale, block) -> out`` once per layer, q (B,T,Hq,D), k/v (B,T,Hkv,D)."""

    name: str
    prepare: Callable[[jax.Array, jax.Array], Any]
    attend: Callable[..., jax.Array]
    attend_full: Callable[..., jax.Array]   # (q, k, v, *, scale, block): bidirectional, no mask
    doc: str = ""


def _xla_prepare(segment_ids, positions):
    return attention_mask(segment_ids, None, positions, positions, causal=True)


def _xla_attend(q, k, v, mask, *, scale, block):
    del block
    return dot_product_attention(q, k, v, mask, scale=scale)


def _xla_attend_full(q, k, v, *, scale, block):
    del block
    return dot_product_attention(q, k, v, None, scale=scale)


def _blockwise_attend_full(q, k, v, *, scale, block):
    return blockwise_attention(q, k, v, causal=False, scale=scale, block_q=block, block_kv=block)


def _blockwise_attend(q, k, v, seg: PackedSegments, *, scale, block):
    return blockwise_attention(q, k, v, seg.segment_ids, None, seg.positions, seg.positions, causal=True,
                               scale=scale, block_q=block, block_kv=block)


# ---- JAX's Pallas kernels: Triton flash attention (GPU) and splash attention (TPU) ----------------
#
# Both take per-row segment ids and mask causally by index. That is this module's rule for packed
# rows: a sample's tokens are contiguous and its positions increase with the index, so "same
# non-zero segment and key index <= query index" selects the same keys as "same segment and key
# position <= query position". Padding (segment 0) attends to padding, never to a sample, and its
# outputs are set to zero as every backend's are. Grouped KV heads are repeated to the query heads
# (the kernels take one head count). On CPU the kernels run in Pallas' interpret mode (tests).

KERNEL_BLOCK = 128   # query / key block of both kernels; rows are padded up to a multiple of it


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _kernel_inputs(q, k, v, segment_ids):
    """k / v with the query's head count; rows padded to a multiple of KERNEL_BLOCK (segment 0)."""
    g = q.shape[2] // k.shape[2]
    if g > 1:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    t = q.shape[1]
    pad = (-t) % KERNEL_BLOCK
    if pad:
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        q, k, v, segment_ids = widen(q), widen(k), widen(v), widen(segment_ids)
    return q, k, v, segment_ids.astype(jnp.int32), t


def _kernel_output(out, segment_ids, t: int, dtype):
    """A kernel's output cut back to the row's ``t`` tokens, padding positions zero (every backend's rule)."""
    return jnp.where((segment_ids > 0)[..., None, None], out[:, :t], 0).astype(dtype)


def _pallas_gpu(q, k, v, segment_ids, *, causal: bool, scale: float):
    from jax.experimental.pallas.ops.gpu import attention as triton_attention
    if jax.default_backend() not in ("gpu", "cuda", "rocm", "cpu"):
        raise ValueError(f"attention backend 'pallas_gpu' runs on GPUs (interpret mode on CPU), not on "
                         f"{jax.default_backend()}")
    qp, kp, vp, seg, t = _kernel_inputs(q, k, v, segment_ids)
    b = KERNEL_BLOCK
    sizes = triton_attention.BlockSizes(block_q=b, block_k=b, block_q_dkv=b, block_kv_dkv=b,
                                        block_q_dq=b, block_kv_dq=b)
    out = triton_attention.mha(qp, kp, vp, seg, sm_scale=scale, causal=causal, block_sizes=sizes,
                               interpret=_interpret())
    return _kernel_output(out, segment_ids, t, q.dtype)


def _splash(q, k, v, segment_ids, *, causal: bool, scale: float):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
    if jax.default_backend() not in ("tpu", "cpu"):
        raise ValueError(f"attention backend 'splash' runs on TPUs (interpret mode on CPU), not on "
                         f"{jax.default_backend()}")
    qp, kp, vp, seg, t = _kernel_inputs(q, k, v, segment_ids)
    n, heads = qp.shape[1], qp.shape[2]
    one = splash_mask.CausalMask((n, n)) if causal else splash_mask.FullMask((n, n))
    b = KERNEL_BLOCK
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    kernel = splash.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                                    block_sizes=sizes, interpret=_interpret())
    heads_first = lambda x: jnp.swapaxes(x, 0, 1)   # splash takes one row as (heads, tokens, dim)

    def row(qr, kr, vr, sr):
        out = kernel((heads_first(qr) * scale).astype(qr.dtype), heads_first(kr), heads_first(vr),
                     segment_ids=splash.SegmentIds(q=sr, kv=sr))
        return heads_first(out)

    return _kernel_output(jax.vmap(row)(qp, kp, vp, seg), segment_ids, t, q.dtype)


def _on_shards(kernel, q, k, v, segment_ids, rows_axis: str, **kw):
    """``kernel`` on each device's rows and heads (``shard_map``) when a multi-device mesh is in
    force: XLA cannot partition a Pallas call itself (it would gather every row onto every device).
    Rows split as ``rows_axis`` says, heads over ``act_heads`` when both head counts divide."""
    from jax.sharding import PartitionSpec as P

    from mmjax import sharding as shd
    mesh = shd.mesh_in_force()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids, **kw)
    rows = shd.logical_to_spec((rows_axis,), q.shape[:1], mesh)[0]
    heads = shd.logical_to_spec((None, None, "act_heads"), q.shape, mesh)[2]
    if heads is not None and shd.logical_to_spec((None, None, "act_heads"), k.shape, mesh)[2] != heads:
        heads = None   # the KV heads do not split as the query heads do: keep heads whole
    tokens = P(rows, None, heads, None)
    return jax.shard_map(functools.partial(kernel, **kw), mesh=mesh, in_specs=(tokens, tokens, tokens, P(rows, None)),
                         out_specs=tokens, check_vma=False)(q, k, v, segment_ids)


def _kernel_backend(name: str, kernel, doc: str) -> "Backend":
    def attend(q, k, v, seg: PackedSegments, *, scale, block):
        del block   # the kernels' own block (KERNEL_BLOCK)
        return _on_shards(kernel, q, k, v, seg.segment_ids, "batch", causal=True, scale=scale)

    def attend_full(q, k, v, *, scale, block):
        del block
        return _on_shards(kernel, q, k, v, jnp.ones(q.shape[:2], jnp.int32), "tiles", causal=False, scale=scale)

    return Backend(name, PackedSegments, attend, attend_full, doc)


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in BACKENDS:
        raise ValueError(f"attention backend {backend.name!r} is registered twice")
    BACKENDS[backend.name] = backend
    return backend


register(Backend("xla", _xla_prepare, _xla_attend, _xla_attend_full, "dense float32 scores under a mask (reference)"))
register(Backend("blockwise", PackedSegments, _blockwise_attend, _blockwise_attend_full,
                 "exact tiled attention, online softmax, O(T * block) memory"))
register(_kernel_backend("pallas_gpu", _pallas_gpu, "JAX's Pallas (Triton) flash attention with segment ids, GPU"))
register(_kernel_backend("splash", _splash, "JAX's splash attention with SegmentIds, TPU"))


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}") from None
