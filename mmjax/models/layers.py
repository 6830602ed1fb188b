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
  semantics). Attention (segment-aware, with its backends) lives in ``attention.py``.
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

from mmjax.models.attention import balanced_block

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


def token_matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False,
                 preferred_element_type=None) -> jax.Array:
    """``x @ w`` (or ``x @ w.T``) for activations ``(..., in)``, computed as one 2-D product over
    all tokens. XLA:CPU lowers a rank-3 ``(B, T, in) x (in, out)`` dot, and above all its weight
    gradient (a contraction over B and T), through transposed copies of the activations: measured
    on a scanned 8-layer SwiGLU stack (4096 tokens, 512 -> 1536), fwd + bwd took 11.1 s with rank-3
    activations and 7.5 s with the tokens flattened first."""
    lead = x.shape[:-1]
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, dims, preferred_element_type=preferred_element_type)
    return y.reshape(lead + (y.shape[-1],))


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``(in, out)``; computes in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(normal_init(rngs, (in_features, out_features), init_std, param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array, image_mask: jax.Array | None = None) -> jax.Array:
        """``image_mask`` (x.shape[:-1], bool): the positions of image tokens, where a partial-LoRA
        branch (``add_partial_lora``, InternLM-XComposer2) adds its low-rank term."""
        y = token_matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if getattr(self, "plora_a", None) is not None and image_mask is not None:
            y = y + jnp.where(image_mask[..., None], _partial_lora_branch(self, x), jnp.zeros((), y.dtype))
        if getattr(self, "lora_a", None) is not None:  # added by mmjax.models.lora.apply_lora
            y = y + _lora_branch(self, x)
        return y


class DropoutState(nnx.Variable):
    """A layer's dropout key / on-flag (LoRA, partial LoRA): not a parameter (no gradient, no
    optimizer state); written per step by ``mmjax.models.lora.set_lora_dropout_key``."""


def dropout_state(prefix: str, module: nnx.Module, rate: float, lead: tuple = (), lead_axes: tuple = ()) -> None:
    """``<prefix>_dropout`` (the rate) and, for a rate > 0, the ``<prefix>_dropout_key`` /
    ``<prefix>_dropout_on`` state of ``module`` (``lead``: leading stack dims already present)."""
    setattr(module, f"{prefix}_dropout", float(rate))
    if rate > 0.0:
        kd = jax.random.key_data(jax.random.key(0))
        setattr(module, f"{prefix}_dropout_key", DropoutState(jnp.zeros(lead + kd.shape, kd.dtype),
                                                              out_sharding=lead_axes + (None,) * kd.ndim,
                                                              eager_sharding=False))
        setattr(module, f"{prefix}_dropout_on", DropoutState(jnp.zeros(lead, bool), out_sharding=lead_axes,
                                                             eager_sharding=False))


def _dropped(module: nnx.Module, prefix: str, h: jax.Array) -> jax.Array:
    """Inverted dropout of ``h`` with the module's ``<prefix>`` key while its flag is on (else ``h``)."""
    rate = float(getattr(module, f"{prefix}_dropout", 0.0))
    key = getattr(module, f"{prefix}_dropout_key", None)
    if rate <= 0.0 or key is None:
        return h
    keep = jax.random.bernoulli(jax.random.wrap_key_data(key[...]), 1.0 - rate, h.shape)
    dropped = jnp.where(keep, h / jnp.asarray(1.0 - rate, h.dtype), jnp.zeros_like(h))
    return jnp.where(getattr(module, f"{prefix}_dropout_on")[...], dropped, h)


def add_partial_lora(dense: Dense, rank: int, scaling: float, *, rngs: nnx.Rngs, param_dtype: Dtype,
                     init_std: float = 0.02, dropout: float = 0.0) -> None:
    """Give ``dense`` a partial-LoRA branch ``scaling * dropout(x) @ plora_a @ plora_b`` at image
    positions (InternLM-XComposer2's ``Plora_A`` / ``Plora_B``; the dropout only while training):
    part of the base model, trained with it in full fine-tuning (plain ``nnx.Param``, not
    adapters). Checkpoints overwrite the initial values."""
    axes = logical_axes(dense.kernel) or (None, None)
    dense.plora_a = param(normal_init(rngs, (dense.in_features, rank), init_std, param_dtype), (axes[0], None))
    dense.plora_b = param(jnp.zeros((rank, dense.out_features), param_dtype), (None, axes[1]))
    dense.plora_scaling = float(scaling)
    dropout_state("plora", dense, dropout)


def _partial_lora_branch(dense: Dense, x: jax.Array) -> jax.Array:
    h = _dropped(dense, "plora", x.astype(dense.dtype))
    h = token_matmul(h, dense.plora_a[...].astype(dense.dtype))
    z = token_matmul(h, dense.plora_b[...].astype(dense.dtype))
    return z * jnp.asarray(dense.plora_scaling, dense.dtype)


def _lora_branch(dense: Dense, x: jax.Array) -> jax.Array:
    """``scaling * dropout(x) @ lora_a @ lora_b`` (peft semantics: dropout on the LoRA input only).

    Dropout runs only while the layer's ``lora_dropout_on`` flag is set, with the key in
    ``lora_dropout_key``; both are written by :func:`mmjax.models.lora.set_lora_dropout_key`.
    """
    h = _dropped(dense, "lora", x.astype(dense.dtype))
    z = token_matmul(token_matmul(h, dense.lora_a[...].astype(dense.dtype)), dense.lora_b[...].astype(dense.dtype))
    return z * jnp.asarray(dense.lora_scaling, dense.dtype)


class RMSNorm(nnx.Module):
    """``weight * cast(x * rsqrt(mean(x^2) + eps))`` with the statistics in float32."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = "embed",
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias; statistics in float32, output in the input dtype."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = "embed",
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)


# The norms are custom_vjp functions too (see the activations below): their backward pass keeps
# the input and the weights and recomputes the per-token statistics (one reduction), where
# autodiff of the plain expressions stores the float32 input, the normalized tensor and the
# product with the weight: (layers, tokens, hidden) arrays for every norm of a scanned stack.


def _sum_leading(x: jax.Array) -> jax.Array:
    """The weight gradient's reduction over every token, accumulated in float32."""
    return jnp.sum(x.reshape(-1, x.shape[-1]).astype(jnp.float32), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``weight * cast(x * rsqrt(mean(x^2) + eps))``, the statistics in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


def _rms_norm_fwd(x, weight, eps):
    return rms_norm(x, weight, eps), (x, weight)


def _rms_norm_bwd(eps, res, dy):
    x, weight = res
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    n = x32 * r
    dw = _sum_leading(dy * n.astype(x.dtype)).astype(weight.dtype)
    dn = (dy * weight.astype(x.dtype)).astype(jnp.float32)
    dx = r * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dw


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) * rsqrt(var + eps) * weight + bias`` in float32, output in the input dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _layer_norm_fwd(x, weight, bias, eps):
    return layer_norm(x, weight, bias, eps), (x, weight, bias)


def _layer_norm_bwd(eps, res, dy):
    x, weight, bias = res
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    xc = x32 - mean
    r = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    n = xc * r
    d32 = dy.astype(jnp.float32)
    dn = d32 * weight.astype(jnp.float32)
    dx = r * (dn - jnp.mean(dn, axis=-1, keepdims=True) - n * jnp.mean(dn * n, axis=-1, keepdims=True))
    return (dx.astype(x.dtype), _sum_leading(d32 * n).astype(weight.dtype),
            _sum_leading(d32).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# --------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------


# The activations are custom_vjp functions that keep only their inputs for the backward pass and
# recompute the derivative there (elementwise, cheap). Autodiff of the plain expressions stores
# their intermediates too: measured on the compare_torch model's train step, the ViT's GELU
# kept four (layers, tiles, 1025, 1536) float32 arrays alive (1.15 GiB) where two suffice, the
# decoder's SwiGLU five (layers, tokens, 1536) arrays where three do (inputs and the product).


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with erf (PyTorch ``nn.GELU()`` / ``ACT2FN['gelu']``), not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu_exact(x), x


def _gelu_bwd(x, dy):
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * (2.0 ** -0.5)))
    pdf = jnp.exp(-0.5 * xf * xf) * ((2.0 * math.pi) ** -0.5)
    return ((dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` (the Llama / Qwen / InternLM2 / Phi-3 MLP's gated activation)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
    gate, up = res
    g = gate.astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    d = dy.astype(jnp.float32)
    d_up = d * (g * s)
    d_gate = d * up.astype(jnp.float32) * s * (1.0 + g * (1.0 - s))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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



def token_chunks(t: int, chunk: int) -> tuple[int, int]:
    """(count, size) of the equal token chunks that split ``t`` tokens with size <= ``chunk``
    (padding under one token a chunk: the tiling of :func:`attention.balanced_block`)."""
    c = balanced_block(chunk, t)
    return -(-t // c), c


def active_token_chunks(segment_ids: jax.Array, chunk: int) -> jax.Array:
    """(count,) bool: the token chunks (:func:`token_chunks`) that hold a real token (segment id
    != 0) in some row."""
    b, t = segment_ids.shape
    n, c = token_chunks(t, chunk)
    real = jnp.pad(segment_ids != 0, ((0, 0), (0, n * c - t)))
    return jnp.any(real.reshape(b, n, c), axis=(0, 2))


def true_first(mask: jax.Array) -> jax.Array:
    """The stable permutation that puts the True entries of a 1-D ``mask`` first, in order."""
    return jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), stable=True)


def scan_skipping(fn: Callable[..., Any], active: jax.Array, *xs: Any) -> Any:
    """``fn`` over the leading (group) axis of ``xs`` under ``lax.scan``, outputs stacked; a group
    whose ``active`` flag is off is a ``lax.cond`` that returns zeros, so its forward and backward
    work is skipped while every shape stays static (no compute on padding, no recompilation)."""
    out = jax.eval_shape(fn, *(jax.tree.map(lambda a: a[0], x) for x in xs))

    def skip(*_):
        return jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out)

    def body(_, step):
        *group, on = step
        return None, jax.lax.cond(on, fn, skip, *group)

    return jax.lax.scan(body, None, (*xs, active))[1]


def map_token_chunks(fn: Callable[..., Any], active: jax.Array, chunk: int, *xs: jax.Array) -> Any:
    """``fn`` (a per-token function of (B, c, ...) arrays) over the token chunks of the (B, T, ...)
    arrays ``xs``, a chunk whose ``active`` flag is off skipped (:func:`scan_skipping`: a packed
    batch's trailing padding). Returns ``fn``'s outputs with the chunks joined back to (B, T, ...)."""
    b, t = xs[0].shape[:2]
    n, c = token_chunks(t, chunk)

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2)) if n * c != t else x
        return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)

    ys = scan_skipping(fn, active, *(split(x) for x in xs))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape((b, n * c) + y.shape[3:])[:, :t], ys)


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
