"""InternLM-XComposer2 family (IXC2-7B, IXC2-VL-7B, IXC2-4KHD-7B, IXC2.5-7B): the CLIP ViT-L/14 tower,
an optional 2x2 patch merge with learnable separators (the HD variants), ``vision_proj`` and an
InternLM2 decoder with partial LoRA (``Plora_A`` / ``Plora_B`` inside ``wqkv``, ``wo``, ``w1``,
``w3``, ``w2``, applied at image-token positions only).

Everything here is the difference over the shared pieces: the tower is :class:`InternViT` in its
CLIP layout, the decoder is the shared :class:`CausalLM` with ``DecoderConfig.plora``, and the
module keeps InternVL's attribute names (``vision_model``, ``mlp1``, ``language_model``), so the
trainer's freeze flags mean upstream's ``fix_vit`` (``freeze.backbone``) and ``fix_sampler``
(``freeze.mlp``: ``vision_proj`` and the separators, which upstream keeps training even under
LoRA through a name-substring rule; mmjax selects parameters explicitly, so they follow the
sampler's flag).

Images reach the model as square tiles (``pixel_values`` (B * K, S, S, 3), CLIP-normalised, row b's
tiles at ``[b K, (b + 1) K)`` as the batch contract lays them out): one tile per image for the plain
variants (``img_size``), and for the HD ones the global view followed by the ``h x w`` crops of the
padded image (:mod:`mmjax.data.hd_images` makes them on the host). Where each position's embedding
comes from is two integers per position: ``image_token`` (B, T) (-1 a text token, ``SUB_GN`` /
``GLB_GN`` a separator, ``FEATURES + t`` token ``t`` of a tile, row-major over its token grid) and
``image_tile`` (B, T) (the tile's slot in its row, -1 otherwise). The layout of an image's tokens
(the global view's rows each closed by ``sub_GN``, ``glb_GN``, the crop mosaic's rows each closed by
``sub_GN``) is computed on the host (:func:`image_token_layout`); the model gathers, so shapes stay
static and a packed row needs only the tile offsets of its samples. ``vision_proj`` runs after the
layout (the separators are projected too), and ``image_token >= 0`` is the decoder's ``im_mask``.

Checkpoint layout (``xcomposer2``): ``vit.vision_tower.vision_model.*`` (transformers CLIP keys),
``vision_proj.{0,2}.*``, ``plora_glb_GN`` (1, 1, F) / ``plora_sub_GN`` (1, 1, 1, F) (HD only),
``model.*`` + ``output.weight`` (InternLM2 + ``*.Plora_A/B.weight``). The checkpoints carry no vision
config: the tower's sizes come from the tensor shapes (head dim 64, CLIP ViT-L/14's), the PLoRA
ranks from ``Plora_A``'s shapes. Tensors the forward pass does not use (CLIP's
``post_layernorm``, IXC2.5's task LoRAs ``lora_{web,sft,dpo}_{A,B}``, ``video_mem_proj``,
``position_ids``) are carried: saved back byte for byte from the source checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.models import internlm2, internvit, projector
from mmjax.models.decoder import CausalLM, DecoderConfig, default_segments
from mmjax.models.layers import Dense, gelu_exact, param
from mmjax.weights.rules import TensorRule

VIT_PREFIX = "vit.vision_tower.vision_model."
ARCHITECTURE = "InternLMXComposer2ForCausalLM"
TEXT, SUB_GN, GLB_GN, FEATURES = -1, 0, 1, 2     # image_token values (FEATURES + t: token t of a tile)
CLIP_HEAD_DIM = 64
# tensors the forward pass never reads; kept unchanged on save (see the module docstring)
CARRIED = re.compile(r"(^vit\.vision_tower\.vision_model\.post_layernorm\.|\.position_ids$|^video_mem_proj\."
                     r"|\.lora_(web|sft|dpo)_[AB]\.weight$)")


def carried_key(key: str) -> bool:
    return bool(CARRIED.search(key))


def is_xcomposer2(config: dict) -> bool:
    archs = config.get("architectures") or []
    auto = " ".join(str(v) for v in (config.get("auto_map") or {}).values())
    return ARCHITECTURE in archs or ARCHITECTURE in auto


def plora_scaling(rank: int) -> float:
    """alpha / r of a PLoRA branch, which no checkpoint stores: the upstream models build every
    branch with alpha = r (256), except IXC2-4KHD's ``wqkv``, which keeps the class defaults
    r = 8, alpha = 16."""
    return 16.0 / rank if rank == 8 else 1.0


@dataclasses.dataclass(frozen=True)
class XComposer2Config:
    vision: internvit.InternViTConfig
    text: DecoderConfig
    hd: bool                        # 2x2 patch merge + sub/glb separators (IXC2-4KHD, IXC2.5)
    img_size: int                   # the side of a tile: the plain variants' image size, the HD crop size
    select_layer: int = -1
    tile_chunk: int = 0             # as InternVLConfig.tile_chunk (training's ViT batching)
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.img_size % self.vision.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size {self.vision.patch_size}")
        if self.hd and (self.img_size // self.vision.patch_size) % 2:
            raise ValueError(f"the HD 2x2 merge needs an even patch grid; img_size {self.img_size} gives "
                             f"{self.img_size // self.vision.patch_size}")

    @property
    def grid(self) -> int:
        """Patches per side of a tile."""
        return self.img_size // self.vision.patch_size

    @property
    def tokens_side(self) -> int:
        """Feature tokens per side of a tile (after the HD merge)."""
        return self.grid // 2 if self.hd else self.grid

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_side ** 2

    @property
    def feature_dim(self) -> int:
        return self.vision.hidden_size * (4 if self.hd else 1)

    @classmethod
    def from_checkpoint(cls, config: dict, shapes: dict[str, tuple[int, ...]], **overrides) -> "XComposer2Config":
        """From the checkpoint's config.json and its tensor shapes (safetensors headers)."""
        def shape(key):
            if key not in shapes:
                raise ValueError(f"XComposer2 checkpoint has no tensor {key}")
            return tuple(shapes[key])

        c = shape(VIT_PREFIX + "embeddings.class_embedding")[0]
        patch = shape(VIT_PREFIX + "embeddings.patch_embedding.weight")[-1]
        n_pos = shape(VIT_PREFIX + "embeddings.position_embedding.weight")[0]
        side = math.isqrt(n_pos - 1)
        if side * side != n_pos - 1:
            raise ValueError(f"CLIP position table of {n_pos} rows is not a square grid + CLS")
        layers = 1 + max(int(m.group(1)) for k in shapes
                         if (m := re.match(re.escape(VIT_PREFIX) + r"encoder\.layers\.(\d+)\.", k)))
        # sizes from the tensors; a vision_config (none in the published checkpoints) may name what
        # the shapes cannot: the head count (else CLIP's head dim 64), the eps and the activation
        vc = dict(config.get("vision_config") or {})
        vision = internvit.config_from_clip({
            "hidden_size": c, "num_hidden_layers": layers,
            "num_attention_heads": int(vc.get("num_attention_heads") or c // CLIP_HEAD_DIM),
            "intermediate_size": shape(VIT_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
            "image_size": side * patch, "patch_size": patch, "hidden_act": vc.get("hidden_act", "quick_gelu"),
            "layer_norm_eps": float(vc.get("layer_norm_eps", 1e-5))}, post_layernorm=False)
        plora = []
        for hf, path in internlm2.PLORA_MODULES:
            key = f"model.layers.0.{hf}.Plora_A.weight"
            if key in shapes:
                r = shape(key)[0]
                plora.append((path[-1], r, plora_scaling(r)))
        text = internlm2.config_from_hf(config, plora=tuple(plora))
        hd = "plora_glb_GN" in shapes
        img = side * patch if hd else int(config.get("img_size") or side * patch)
        kw = dict(vision=vision, text=text, hd=hd, img_size=img, raw=dict(config))
        kw.update(overrides)
        return cls(**kw)


class Sampler(nnx.Module):
    """``vision_proj`` (Linear -> exact GELU -> Linear, both with bias) and, for the HD variants,
    the separators ``sub_gn`` (1, 1, 1, F) and ``glb_gn`` (1, 1, F) in the feature space."""

    def __init__(self, cfg: XComposer2Config, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        f, h = cfg.feature_dim, cfg.text.hidden_size
        self.dtype = dtype
        self.linear_1 = Dense(f, h, axes=("vit_embed", "mlp"), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
        self.linear_2 = Dense(h, h, axes=("mlp", "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
        if cfg.hd:
            self.sub_gn = param(jnp.zeros((1, 1, 1, f), param_dtype), (None, None, None, "vit_embed"))
            self.glb_gn = param(jnp.zeros((1, 1, f), param_dtype), (None, None, "vit_embed"))
        else:
            self.sub_gn = self.glb_gn = None

    def separators(self, f: int, dtype) -> jax.Array:
        """(2, F): rows ``SUB_GN`` and ``GLB_GN`` (zeros for the plain variants, never referenced)."""
        if self.sub_gn is None:
            return jnp.zeros((2, f), dtype)
        return jnp.concatenate([self.sub_gn[...].reshape(1, f), self.glb_gn[...].reshape(1, f)]).astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(gelu_exact(self.linear_1(x.astype(self.dtype))))


class XComposer2(nnx.Module):
    """CLIP tower (``vision_model``) + ``mlp1`` (:class:`Sampler`) + partial-LoRA InternLM2 (``language_model``)."""

    def __init__(self, cfg: XComposer2Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        self.vision_model = internvit.InternViT(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp1 = Sampler(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = CausalLM(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # ---- pieces ------------------------------------------------------------------------------

    def tile_features(self, pixel_values: jax.Array) -> jax.Array:
        """(N, S, S, 3) tiles -> (N, tokens_per_tile, F): the selected CLIP layer without CLS, 2x2
        merged for the HD variants (channel block (2 di + dj) holds patch (2a + di, 2b + dj))."""
        x = self.vision_model(pixel_values, self.cfg.select_layer)
        return projector.pixel_shuffle(x, 0.5, "v2") if self.cfg.hd else x

    def vision_layers_read(self) -> int:
        return self.vision_model.layers_read(self.cfg.select_layer)

    def embed_multimodal(self, input_ids: jax.Array, pixel_values: jax.Array | None, image_token: jax.Array | None,
                         image_tile: jax.Array | None = None, *, check: bool = True
                         ) -> tuple[jax.Array, jax.Array | None]:
        """Token embeddings with the projected image tokens gathered in: ``(embeds (B, T, H),
        image_mask (B, T) or None)``. With ``check`` and concrete inputs a tile or token past the
        features raises ValueError."""
        embeds = self.language_model.embed(input_ids)
        if image_token is None:
            return embeds, None
        image_token = image_token.astype(jnp.int32)
        image_tile = jnp.full_like(image_token, -1) if image_tile is None else image_tile.astype(jnp.int32)
        f, per = self.cfg.feature_dim, self.cfg.tokens_per_tile
        b = input_ids.shape[0]
        n = 0 if pixel_values is None else pixel_values.shape[0]
        if n % b:
            raise ValueError(f"{n} tiles do not split into {b} rows")
        k = n // b
        if check and not any(isinstance(a, jax.core.Tracer) for a in (image_token, image_tile)):
            tiles, kinds = np.asarray(image_tile), np.asarray(image_token)
            if np.any(tiles >= k) or np.any((tiles >= 0) != (kinds >= FEATURES)) or np.any(kinds >= FEATURES + per):
                raise ValueError(f"image_tile / image_token name tiles or tokens past the {k} tiles a row "
                                 f"holds ({per} tokens a tile), or disagree on which positions are image tokens")
        feats = jnp.zeros((0, f), self.dtype) if n == 0 else \
            self.tile_features(pixel_values).reshape(n * per, f).astype(self.dtype)
        bank = self.mlp1(jnp.concatenate([self.mlp1.separators(f, feats.dtype), feats]))
        row_tile = jnp.arange(b, dtype=jnp.int32)[:, None] * k + image_tile
        index = jnp.where(image_tile >= 0, FEATURES + row_tile * per + (image_token - FEATURES), image_token)
        mask = image_token >= 0
        gathered = jnp.take(bank, jnp.clip(index, 0, bank.shape[0] - 1), axis=0).astype(embeds.dtype)
        return jnp.where(mask[..., None], gathered, embeds), mask

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_token=None, image_tile=None,
                      segment_ids=None, positions=None, *, check: bool = True) -> jax.Array:
        embeds, mask = self.embed_multimodal(input_ids, pixel_values, image_token, image_tile, check=check)
        seg, pos = default_segments(input_ids.shape, attention_mask, segment_ids, positions)
        hidden, _ = self.language_model.decode_embeds(embeds, seg, pos, image_mask=mask)
        return hidden

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_token=None, image_tile=None,
                 segment_ids=None, positions=None) -> jax.Array:
        """Logits (B, T, V) float32."""
        return self.language_model.logits(self.hidden_states(input_ids, attention_mask, pixel_values, image_token,
                                                             image_tile, segment_ids, positions))

    def generate(self, input_ids, pixel_values=None, image_token=None, image_tile=None, **kwargs):
        """``(ids (B, max_new_tokens), lengths (B,))`` after an unpadded prompt; kwargs as
        ``mmjax.models.generation.generate``. The prompt's image tokens prefill with the partial LoRA."""
        from mmjax.models.generation import generate
        embeds, mask = self.embed_multimodal(input_ids, pixel_values, image_token, image_tile)
        return generate(self.language_model, embeds, jnp.ones(input_ids.shape, jnp.int32), prefill_image_mask=mask,
                        **kwargs)

    # ---- weights -------------------------------------------------------------------------------

    @property
    def hf_layout(self) -> str:
        return "xcomposer2"

    def hf_config(self) -> dict:
        return dict(self.cfg.raw)

    def weight_rules(self) -> list[TensorRule]:
        R = TensorRule
        rules = [r.with_prefix(VIT_PREFIX, ("vision_model",)) for r in internvit.weight_rules(self.cfg.vision, "clip")]
        rules += [R("vision_proj.0.weight", ("mlp1", "linear_1", "kernel"), "linear"),
                  R("vision_proj.0.bias", ("mlp1", "linear_1", "bias")),
                  R("vision_proj.2.weight", ("mlp1", "linear_2", "kernel"), "linear"),
                  R("vision_proj.2.bias", ("mlp1", "linear_2", "bias"))]
        if self.cfg.hd:
            rules += [R("plora_sub_GN", ("mlp1", "sub_gn")), R("plora_glb_GN", ("mlp1", "glb_gn"))]
        rules += [r.with_prefix("", ("language_model",)) for r in self.language_model.weight_rules()]
        return rules

    def num_layers_map(self) -> dict[tuple[str, ...], int]:
        out = {("vision_model", "layers"): self.cfg.vision.num_layers}
        out.update({("language_model",) + k: v for k, v in self.language_model.num_layers_map().items()})
        return out


# ---- the image token layout (host side) -------------------------------------------------------------


def image_token_count(grid: tuple[int, int] | None, tokens_side: int) -> int:
    """Tokens of one image: ``s^2`` for a plain tile (``grid`` None), else for an ``h x w`` crop grid
    ``(h w + 1) s^2 + 1 + (h + 1) s`` (global view rows + separators, glb_GN, the crop mosaic's rows
    + separators)."""
    s = tokens_side
    if grid is None:
        return s * s
    h, w = grid
    return (h * w + 1) * s * s + 1 + (h + 1) * s


def image_token_layout(grid: tuple[int, int] | None, tokens_side: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image_token, image_tile)`` of one image's tokens in sequence order, its tiles numbered from
    0 (the HD variants: the global view, then the crops row by row, as the data pipeline emits them)."""
    s = tokens_side
    kinds, tiles = [], []

    def tile_row(tile, r):
        kinds.extend(FEATURES + r * s + np.arange(s))
        tiles.extend([tile] * s)

    def separator(code):
        kinds.append(code)
        tiles.append(-1)

    if grid is None:
        for r in range(s):
            tile_row(0, r)
    else:
        h, w = grid
        for r in range(s):                  # the global view, each row closed by sub_GN
            tile_row(0, r)
            separator(SUB_GN)
        separator(GLB_GN)
        for mr in range(h * s):             # mosaic row mr crosses the crops of crop row mr // s
            for cc in range(w):
                tile_row(1 + (mr // s) * w + cc, mr % s)
            separator(SUB_GN)
    out = np.asarray(kinds, np.int32), np.asarray(tiles, np.int32)
    assert out[0].size == image_token_count(grid, s)
    return out
