"""InternViT: the InternVL vision encoder (300M-style and 6B-style variants from config flags).

Math (see docs/architecture.md and the InternVL reference study, section 1.2):

    x = concat(cls, patchify(pixels) @ W_patch + b) + pos        # pos bicubically resized to the grid
    for each layer (pre-norm, layer scale, DropPath):
        x = x + drop_path(ls1 * proj(attn(norm1(x))))
        x = x + drop_path(ls2 * fc2(gelu(fc1(norm2(x)))))

No final norm. ``select_layer`` picks the output of one layer (-1 = last; k >= 0 indexes
``[embedding output, layer 0 output, ...]``) and the CLS token is dropped.

The same module is the CLIP vision tower of InternLM-XComposer2 (``clip_layout``: transformers'
``CLIPVisionModel`` keys and shapes): a LayerNorm after the embeddings (``pre_layrnorm``), no
layer scale, quick-GELU, a patch convolution without bias; its ``post_layernorm`` is not on the
feature path (features are a hidden state, as upstream selects them) and is kept only for the
checkpoint.

Parameter structure mirrors the checkpoint: upstream InternVL-Chat stores a fused ``attn.qkv``
([Q | K | V], heads contiguous), the transformers-native ``InternVLVisionModel`` stores separate
``q_proj`` / ``k_proj`` / ``v_proj``; ``qkv_layout`` selects which one this module holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.models import attention as attn_lib
from mmjax.models.layers import Dense, LayerNorm, RMSNorm, gelu_exact, param, scan_layers, stacked, token_matmul
from mmjax.sharding import constrain
from mmjax.weights.rules import TensorRule

Dtype = Any
TOKEN_AXES = ("tiles", "vit_tokens", "act_embed")   # the logical axes of the ViT's hidden states

NORM_TYPES = ("layer_norm", "rms_norm")
QKV_LAYOUTS = ("fused", "separate")
ACTIVATIONS = ("gelu", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class InternViTConfig:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "layer_norm"          # layer_norm (weight + bias) | rms_norm (weight only)
    eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False         # RMSNorm over all heads together (dim = hidden_size)
    qkv_layout: str = "fused"              # fused: attn.qkv [Q|K|V] | separate: q_proj/k_proj/v_proj
    layer_scale_init: float = 1.0          # ls1 / ls2 init (checkpoints overwrite it)
    drop_path_rate: float = 0.0            # DropPath rates = linspace(0, rate, num_layers)
    hidden_act: str = "gelu"               # gelu (exact) | quick_gelu (CLIP)
    # CLIP's differences (transformers CLIPVisionModel): its checkpoint shapes for the CLS and
    # position embeddings, a LayerNorm after the embeddings, no layer scale, no patch bias; and
    # whether the checkpoint carries the (unused) post_layernorm
    clip_layout: bool = False
    post_layernorm: bool = False
    remat: str = "none"                    # policy name in layers.REMAT_POLICIES
    attention: str = "xla"                 # a backend of mmjax.models.attention (its attend_full)
    attention_block: int = 0               # tile bound of tiled backends (0: the whole sequence)

    def __post_init__(self):
        if self.attention not in attn_lib.BACKENDS:
            raise ValueError(f"attention must be one of {sorted(attn_lib.BACKENDS)}, got {self.attention!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if self.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {self.qkv_layout!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.clip_layout and (self.qkv_layout != "separate" or self.norm_type != "layer_norm"):
            raise ValueError("the CLIP layout has separate q/k/v and LayerNorms")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


def _pair(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"non-square size {v} is not supported")
        return int(v[0])
    return int(v)


# InternViTConfig field <- (key, default) in an upstream ``intern_vit_6b`` vision_config, and in a
# transformers ``internvl_vision`` one. Upstream defaults are ``InternVisionConfig``'s class
# defaults (6B-style: rms_norm, qk_normalization, no qkv bias), which the upstream code applies to
# configs that do not spell them out; transformers' are ``InternVLVisionConfig``'s.
_CONFIG_KEYS = {
    "hidden_size": (("hidden_size", 3200), ("hidden_size", 1024)),
    "num_layers": (("num_hidden_layers", 48), ("num_hidden_layers", 24)),
    "num_heads": (("num_attention_heads", 25), ("num_attention_heads", 16)),
    "intermediate_size": (("intermediate_size", 12800), ("intermediate_size", 4096)),
    "image_size": (("image_size", 224), ("image_size", 448)),
    "patch_size": (("patch_size", 14), ("patch_size", 14)),
    "num_channels": (("num_channels", 3), ("num_channels", 3)),
    "norm_type": (("norm_type", "rms_norm"), ("norm_type", "layer_norm")),
    "eps": (("layer_norm_eps", 1e-6), ("layer_norm_eps", 1e-6)),
    "qkv_bias": (("qkv_bias", False), ("attention_bias", False)),
    "qk_normalization": (("qk_normalization", True), ("use_qk_norm", False)),
    "layer_scale_init": (("initializer_factor", 0.1), ("layer_scale_init_value", 0.1)),
    "drop_path_rate": (("drop_path_rate", 0.0), ("drop_path_rate", 0.0)),
    "hidden_act": (("hidden_act", "gelu"), ("hidden_act", "gelu")),
}


def _read_config(vc: dict, which: int, qkv_layout: str, overrides: dict) -> InternViTConfig:
    kw = {field: vc.get(*keys[which]) for field, keys in _CONFIG_KEYS.items()}
    kw["image_size"], kw["patch_size"] = _pair(kw["image_size"]), _pair(kw["patch_size"])
    kw["qkv_layout"] = qkv_layout
    kw.update(overrides)
    return InternViTConfig(**kw)


def config_from_upstream(vc: dict, **overrides) -> InternViTConfig:
    """From an upstream ``intern_vit_6b`` vision_config (InternViT-300M and -6B alike; fused qkv)."""
    return _read_config(vc, 0, "fused", overrides)


def config_from_hf(vc: dict, **overrides) -> InternViTConfig:
    """From a transformers ``InternVLVisionConfig`` dict (``model_type: internvl_vision``; separate q/k/v)."""
    if not vc.get("use_absolute_position_embeddings", True) or vc.get("use_mask_token", False):
        raise ValueError("InternViT needs absolute position embeddings and no mask token")
    if not vc.get("use_mean_pooling", True):
        # use_mean_pooling=False adds a final LayerNorm that InternVL checkpoints never carry.
        raise ValueError("use_mean_pooling=False (final vision layernorm) is not supported")
    return _read_config(vc, 1, "separate", overrides)


# --------------------------------------------------------------------------------------------
# Bicubic resize matching torch F.interpolate(mode='bicubic', align_corners=False)
# --------------------------------------------------------------------------------------------

_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fraction t."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 matrix M with ``resize(x) = M @ x`` along one axis, PyTorch semantics.

    Source coordinate ``(o + 0.5) * in / out - 0.5`` (not clamped at 0 for cubic), taps at
    ``floor(src) - 1 .. floor(src) + 2`` clamped to the border (replicate), coefficient -0.75.
    Identity when ``in_size == out_size``.
    """
    scale = in_size / out_size
    o = np.arange(out_size, dtype=np.float64)
    src = (o + 0.5) * scale - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)                                   # (out, 4)
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), 4), idx.reshape(-1)), w.reshape(-1))
    return m


def bicubic_resize_2d(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Resize the two leading spatial axes of ``x`` (H, W, C) like torch bicubic, align_corners=False."""
    h, w = x.shape[0], x.shape[1]
    if (h, w) == (out_h, out_w):
        return x
    mh = jnp.asarray(bicubic_matrix(h, out_h), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(w, out_w), jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,hwc->owc", mh, x.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,owc->opc", mw, y, precision=hp)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def config_from_clip(vc: dict, **overrides) -> InternViTConfig:
    """From a transformers ``CLIPVisionConfig`` dict (``model_type: clip_vision_model``; its class
    defaults for absent keys are the ViT-B/32 ones, so XComposer2 passes the ViT-L/14 values)."""
    act = vc.get("hidden_act", "quick_gelu")
    kw = dict(hidden_size=int(vc.get("hidden_size", 768)), num_layers=int(vc.get("num_hidden_layers", 12)),
              num_heads=int(vc.get("num_attention_heads", 12)),
              intermediate_size=int(vc.get("intermediate_size", 3072)),
              image_size=_pair(vc.get("image_size", 224)), patch_size=_pair(vc.get("patch_size", 32)),
              num_channels=int(vc.get("num_channels", 3)), norm_type="layer_norm",
              eps=float(vc.get("layer_norm_eps", 1e-5)), qkv_bias=True, qk_normalization=False,
              qkv_layout="separate", hidden_act=act, clip_layout=True, post_layernorm=True)
    kw.update(overrides)
    return InternViTConfig(**kw)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def _norm(cfg: InternViTConfig, dim: int, axis: str | None, param_dtype) -> nnx.Module:
    if cfg.norm_type == "layer_norm":
        return LayerNorm(dim, eps=cfg.eps, axis_name=axis, param_dtype=param_dtype)
    return RMSNorm(dim, eps=cfg.eps, axis_name=axis, param_dtype=param_dtype)


class PatchEmbedding(nnx.Module):
    """Conv2d(kernel = stride = patch, bias) as patchify + matmul; kernel kept HWIO (rule 'conv')."""

    def __init__(self, cfg: InternViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, c = cfg.patch_size, cfg.num_channels
        self.patch_size, self.dtype = p, dtype
        std = 1.0 / math.sqrt(p * p * c)
        self.kernel = param((std * jax.random.normal(rngs.params(), (p, p, c, cfg.hidden_size))).astype(param_dtype),
                            (None, None, None, "vit_embed"))
        self.bias = None if cfg.clip_layout else param(jnp.zeros((cfg.hidden_size,), param_dtype), ("vit_embed",))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        n, h, w, c = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        x = pixels.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, p * p * c)
        k = self.kernel[...].reshape(p * p * c, -1)
        y = token_matmul(x.astype(self.dtype), k.astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ViTAttention(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = cfg.hidden_size
        self.num_heads, self.head_dim, self.layout = cfg.num_heads, cfg.head_dim, cfg.qkv_layout
        self.attention, self.attention_block = cfg.attention, cfg.attention_block
        dense = functools.partial(Dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.qkv_layout == "fused":
            self.qkv = dense(c, 3 * c, axes=("vit_embed", "vit_heads"), use_bias=cfg.qkv_bias)
        else:
            self.q_proj = dense(c, c, axes=("vit_embed", "vit_heads"), use_bias=cfg.qkv_bias)
            self.k_proj = dense(c, c, axes=("vit_embed", "vit_heads"), use_bias=cfg.qkv_bias)
            self.v_proj = dense(c, c, axes=("vit_embed", "vit_heads"), use_bias=cfg.qkv_bias)
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(c, eps=cfg.eps, axis_name="norm", param_dtype=param_dtype)
            self.k_norm = RMSNorm(c, eps=cfg.eps, axis_name="norm", param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.proj = dense(c, c, axes=("vit_heads", "vit_embed"), use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, c = x.shape
        if self.layout == "fused":
            q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        shape, axes = (n, t, self.num_heads, self.head_dim), ("tiles", "vit_tokens", "act_heads", None)
        q, k, v = (constrain(a.reshape(shape), axes) for a in (q, k, v))
        o = attn_lib.get_backend(self.attention).attend_full(q, k, v,
                                                              scale=self.head_dim ** -0.5, block=self.attention_block or t)
        return self.proj(o.reshape(n, t, c))


class ViTMLP(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dense = functools.partial(Dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=True)
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, axes=("vit_embed", "vit_mlp"))
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, axes=("vit_mlp", "vit_embed"))
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else gelu_exact

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(constrain(self.fc1(x), ("tiles", "vit_tokens", "act_mlp"))))


def _drop_path(y: jax.Array, key: jax.Array | None, rate: jax.Array | None) -> jax.Array:
    """Per-tile stochastic depth (timm): keep with prob 1 - rate, scale kept tiles by 1/(1 - rate)."""
    if key is None:
        return y
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(keep, y / keep_prob.astype(y.dtype), jnp.zeros_like(y))


class InternViTLayer(nnx.Module):
    def __init__(self, cfg: InternViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = cfg.hidden_size
        self.norm1 = _norm(cfg, c, "vit_embed", param_dtype)
        self.attn = ViTAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = _norm(cfg, c, "vit_embed", param_dtype)
        self.mlp = ViTMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.clip_layout:   # no layer scale
            self.ls1 = self.ls2 = None
        else:
            self.ls1 = param(jnp.full((c,), cfg.layer_scale_init, param_dtype), ("vit_embed",))
            self.ls2 = param(jnp.full((c,), cfg.layer_scale_init, param_dtype), ("vit_embed",))

    def __call__(self, x: jax.Array, keys: jax.Array | None = None, rate: jax.Array | None = None) -> jax.Array:
        k1 = k2 = None
        if keys is not None:
            k1, k2 = keys[0], keys[1]
        dt = x.dtype
        scale = (lambda y, ls: y) if self.ls1 is None else (lambda y, ls: y * ls[...].astype(dt))
        y = scale(self.attn(self.norm1(x)), self.ls1)
        x = x + _drop_path(y, k1, rate).astype(dt)
        y = scale(self.mlp(self.norm2(x)), self.ls2)
        return x + _drop_path(y, k2, rate).astype(dt)


class InternViT(nnx.Module):
    """pixel_values (N, H, W, C) normalized -> (N, (H/p)*(W/p), hidden) of ``select_layer``, CLS dropped."""

    def __init__(self, cfg: InternViTConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        c = cfg.hidden_size
        self.patch_embedding = PatchEmbedding(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # the checkpoint's shapes: (1, 1, C) / (1, 1 + P, C) upstream, (C,) / (1 + P, C) in CLIP
        cls_shape, pos_shape = ((c,), (1 + cfg.num_patches, c)) if cfg.clip_layout else \
            ((1, 1, c), (1, 1 + cfg.num_patches, c))
        self.class_embedding = param((0.02 * jax.random.normal(rngs.params(), cls_shape)).astype(param_dtype),
                                     (None,) * (len(cls_shape) - 1) + ("vit_embed",))
        self.position_embedding = param(
            (0.02 * jax.random.normal(rngs.params(), pos_shape)).astype(param_dtype),
            (None,) * (len(pos_shape) - 1) + ("vit_embed",))
        self.pre_layrnorm = LayerNorm(c, eps=cfg.eps, axis_name="vit_embed", param_dtype=param_dtype) \
            if cfg.clip_layout else None
        self.post_layernorm = LayerNorm(c, eps=cfg.eps, axis_name="vit_embed", param_dtype=param_dtype) \
            if cfg.clip_layout and cfg.post_layernorm else None
        self.layers = stacked(lambda r: InternViTLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                              cfg.num_layers, rngs)

    # ---------------------------------------------------------------------------------------
    def position_embeddings(self, gh: int, gw: int) -> jax.Array:
        """(1, 1 + gh*gw, C) float32: CLS position as is, patch grid bicubically resized."""
        g, c = self.cfg.grid, self.cfg.hidden_size
        pos = self.position_embedding[...].astype(jnp.float32).reshape(1, 1 + g * g, c)
        if (gh, gw) == (g, g):
            return pos
        grid = bicubic_resize_2d(pos[0, 1:].reshape(g, g, c), gh, gw).reshape(1, gh * gw, c)
        return jnp.concatenate([pos[:, :1], grid], axis=1)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        n, h, w, _ = pixel_values.shape
        p = self.cfg.patch_size
        x = self.patch_embedding(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].reshape(1, 1, -1).astype(x.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        # positions are resized in float32 and cast to the compute dtype before the add (as upstream)
        x = x.astype(self.dtype) + self.position_embeddings(h // p, w // p).astype(self.dtype)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        return constrain(x, TOKEN_AXES)

    def layers_read(self, select_layer: int = -1) -> int:
        """How many layers (the first ones) the features of ``select_layer`` depend on; the layers
        after them never run and never receive a gradient."""
        n = self.cfg.num_layers
        k = n + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= k <= n:
            raise ValueError(f"select_layer out of range for {n} layers")
        return k

    def __call__(self, pixel_values: jax.Array, select_layer: int = -1, *, deterministic: bool = True,
                 rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """Features of ``select_layer`` without CLS. DropPath runs only with ``deterministic=False``
        and a key (``rngs`` an ``nnx.Rngs`` with a ``dropout`` stream, or a PRNG key)."""
        cfg = self.cfg
        n_layers = cfg.num_layers
        select_layer = self.layers_read(select_layer)
        use_drop = (not deterministic) and cfg.drop_path_rate > 0.0
        if use_drop and rngs is None:
            raise ValueError("deterministic=False with drop_path_rate > 0 needs rngs (a key or nnx.Rngs)")
        x = self.embed(pixel_values)
        if select_layer == 0:
            return x[:, 1:]

        layers = self.layers
        if select_layer < n_layers:  # hidden_states[k] only needs the first k layers
            graphdef, state = nnx.split(self.layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:select_layer], state))

        if use_drop:
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            rates = jnp.linspace(0.0, cfg.drop_path_rate, n_layers, dtype=jnp.float32)[:select_layer]
            keys = jax.random.split(key, (select_layer, 2))
            xs = (keys, rates)
        else:
            xs = None

        def body(layer, h, per_layer):
            if per_layer is None:
                return constrain(layer(h), TOKEN_AXES), None
            k, r = per_layer
            return constrain(layer(h, k, r), TOKEN_AXES), None

        x, _ = scan_layers(layers, body, x, xs, remat=cfg.remat)
        return x[:, 1:]

    # ---------------------------------------------------------------------------------------
    def weight_rules(self, layout: str | None = None) -> list[TensorRule]:
        """The tensor rules in ``layout`` (default: the one this module's config stores, :func:`own_layout`)."""
        return weight_rules(self.cfg, own_layout(self.cfg) if layout is None else layout)


def own_layout(cfg: InternViTConfig) -> str:
    """The checkpoint layout a config's parameters are shaped for: ``clip`` (CLIP keys and shapes),
    ``internvl_chat`` (fused qkv) or ``hf`` (separate q/k/v)."""
    if cfg.clip_layout:
        return "clip"
    return "internvl_chat" if cfg.qkv_layout == "fused" else "hf"


def weight_rules(cfg: InternViTConfig, layout: str = "internvl_chat") -> list[TensorRule]:
    """HF tensor names relative to the vision module ('vision_model.' / 'model.vision_tower.' not included).

    layout ``internvl_chat`` (upstream, fused qkv), ``hf`` (transformers, separate q/k/v) or
    ``clip`` (transformers ``CLIPVisionModel``, relative to its ``vision_model.``).
    """
    want = {"internvl_chat": "fused", "hf": "separate", "clip": "separate"}
    if layout not in want:
        raise ValueError(f"unknown layout {layout!r}")
    if cfg.qkv_layout != want[layout]:
        raise ValueError(f"layout {layout!r} stores qkv {want[layout]}, but the module holds {cfg.qkv_layout}")
    R = TensorRule
    L = ("layers",)
    has_norm_bias = cfg.norm_type == "layer_norm"

    def linear(key, path, bias=True):
        out = [R(key + ".weight", L + path + ("kernel",), "linear")]
        if bias:
            out.append(R(key + ".bias", L + path + ("bias",)))
        return out

    def norm(key, path, bias=has_norm_bias):
        out = [R(key + ".weight", L + path + ("weight",))]
        if bias:
            out.append(R(key + ".bias", L + path + ("bias",)))
        return out

    if (layout == "clip") != cfg.clip_layout:
        raise ValueError(f"layout {layout!r} does not match the module's clip_layout={cfg.clip_layout}")
    if layout == "clip":
        e, p = "embeddings.", "encoder.layers.{i}."
        rules = [R(e + "class_embedding", ("class_embedding",)),
                 R(e + "patch_embedding.weight", ("patch_embedding", "kernel"), "conv"),
                 R(e + "position_embedding.weight", ("position_embedding",)),
                 R("pre_layrnorm.weight", ("pre_layrnorm", "weight")), R("pre_layrnorm.bias", ("pre_layrnorm", "bias"))]
        for name in ("q_proj", "k_proj", "v_proj"):
            rules += linear(p + "self_attn." + name, ("attn", name))
        rules += linear(p + "self_attn.out_proj", ("attn", "proj"))
        rules += linear(p + "mlp.fc1", ("mlp", "fc1")) + linear(p + "mlp.fc2", ("mlp", "fc2"))
        rules += norm(p + "layer_norm1", ("norm1",)) + norm(p + "layer_norm2", ("norm2",))
        if cfg.post_layernorm:
            rules += [R("post_layernorm.weight", ("post_layernorm", "weight")),
                      R("post_layernorm.bias", ("post_layernorm", "bias"))]
        return rules

    if layout == "internvl_chat":
        e, p = "embeddings.", "encoder.layers.{i}."
        rules = [R(e + "class_embedding", ("class_embedding",)),
                 R(e + "patch_embedding.weight", ("patch_embedding", "kernel"), "conv"),
                 R(e + "patch_embedding.bias", ("patch_embedding", "bias")),
                 R(e + "position_embedding", ("position_embedding",))]
        rules += linear(p + "attn.qkv", ("attn", "qkv"), cfg.qkv_bias)
        if cfg.qk_normalization:
            rules += norm(p + "attn.q_norm", ("attn", "q_norm"), False)
            rules += norm(p + "attn.k_norm", ("attn", "k_norm"), False)
        rules += linear(p + "attn.proj", ("attn", "proj"))
        rules += linear(p + "mlp.fc1", ("mlp", "fc1")) + linear(p + "mlp.fc2", ("mlp", "fc2"))
        rules += norm(p + "norm1", ("norm1",)) + norm(p + "norm2", ("norm2",))
        rules += [R(p + "ls1", L + ("ls1",)), R(p + "ls2", L + ("ls2",))]
        return rules

    e, p = "embeddings.", "encoder.layer.{i}."
    rules = [R(e + "cls_token", ("class_embedding",)),
             R(e + "patch_embeddings.projection.weight", ("patch_embedding", "kernel"), "conv"),
             R(e + "patch_embeddings.projection.bias", ("patch_embedding", "bias")),
             R(e + "position_embeddings", ("position_embedding",))]
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += linear(p + "attention." + name, ("attn", name), cfg.qkv_bias)
    if cfg.qk_normalization:
        rules += norm(p + "attention.q_norm", ("attn", "q_norm"), False)
        rules += norm(p + "attention.k_norm", ("attn", "k_norm"), False)
    rules += linear(p + "attention.projection_layer", ("attn", "proj"))
    rules += linear(p + "mlp.fc1", ("mlp", "fc1")) + linear(p + "mlp.fc2", ("mlp", "fc2"))
    rules += norm(p + "layernorm_before", ("norm1",)) + norm(p + "layernorm_after", ("norm2",))
    rules += [R(p + "lambda_1", L + ("ls1",)), R(p + "lambda_2", L + ("ls2",))]
    return rules
