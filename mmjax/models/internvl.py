"""InternVL composition: InternViT -> pixel shuffle -> ``mlp1`` -> scatter into ``<IMG_CONTEXT>`` slots -> LLM.

Two checkpoint layouts share one module:

* ``internvl_chat`` (upstream OpenGVLab InternVL-Chat): ``vision_model.*`` (fused ``attn.qkv``),
  ``mlp1.{0,1,3}.*``, ``language_model.`` + the plain causal-LM keys.
* ``hf`` (transformers ``InternVLForConditionalGeneration``): ``model.vision_tower.*`` (separate
  q/k/v), ``model.multi_modal_projector.*``, ``model.language_model.*`` (the causal-LM keys with
  ``model.`` -> ``model.language_model.``), ``lm_head.weight``. :func:`canonical_hf_key` maps the
  older spellings (``language_model.model.*``, ``vision_tower.*``, ...) onto these.

Image features replace the ``<IMG_CONTEXT>`` embeddings in order: real tiles (``image_flags != 0``)
in tile order, the tokens of a tile in pixel-shuffle order, positions row-major over the batch.
Shapes stay static: tiles are stably reordered real-first and gathered by a running count of the
context positions. A count mismatch raises ``ValueError`` on concrete (eager) inputs; under tracing
:meth:`InternVL.forward` returns an ``image_token_mismatch`` flag instead (the trainer zeroes the
loss of such a batch, as upstream does), and :meth:`InternVL.__call__` returns NaN logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.models import internvit, projector
from mmjax.models.decoder import CausalLM, DecoderConfig, default_segments
from mmjax.models.families import family_module
from mmjax.models.layers import scan_skipping, true_first
from mmjax.sharding import constrain
from mmjax.weights.rules import TensorRule

LAYOUTS = ("internvl_chat", "hf")
# InternVL-Chat (the classic tree) forces untied embeddings for these LLMs; newer ones follow the LLM config.
_FORCED_UNTIED = ("InternLM2ForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    vision: internvit.InternViTConfig
    text: DecoderConfig
    layout: str = "internvl_chat"              # internvl_chat | hf
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    img_context_token_id: int | None = None    # <IMG_CONTEXT>; from the tokenizer for internvl_chat
    num_image_token: int | None = None         # tokens per tile; derived when None
    template: str | None = None
    projector_act: str = "gelu"
    # training's ViT batching: tiles encoded this many at a time, real tiles first, a group with no
    # real tile skipped at run time (0: every tile slot in one batch, padding tiles included)
    tile_chunk: int = 0
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.ps_version not in projector.PS_VERSIONS:
            raise ValueError(f"ps_version must be one of {projector.PS_VERSIONS}, got {self.ps_version!r}")
        derived = int(self.vision.grid ** 2 * self.downsample_ratio ** 2)
        if not isinstance(self.tile_chunk, int) or self.tile_chunk < 0:
            raise ValueError(f"tile_chunk must be an integer >= 0, got {self.tile_chunk!r}")
        if self.num_image_token is None:
            object.__setattr__(self, "num_image_token", derived)
        elif self.num_image_token != derived:
            raise ValueError(f"num_image_token {self.num_image_token} != (image/patch)^2 * ratio^2 = {derived}")

    @property
    def vit_out_features(self) -> int:
        return int(self.vision.hidden_size * round(1.0 / self.downsample_ratio) ** 2)

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def from_internvl_chat(cls, config: dict, image_token_id: int | None = None, **overrides) -> "InternVLConfig":
        """From an upstream ``internvl_chat`` config.json. ``image_token_id`` (``<IMG_CONTEXT>``) comes
        from the tokenizer; it may stay None for text-only use."""
        vc = dict(config.get("vision_config") or {})
        force = config.get("force_image_size")
        vkw = {"image_size": internvit._pair(force)} if force else {}
        vision = internvit.config_from_upstream(vc, **vkw)
        llm = dict(config.get("llm_config") or {})
        arch = (llm.get("architectures") or [None])[0]
        if arch in _FORCED_UNTIED:
            llm["tie_word_embeddings"] = False
        text = family_module(llm).config_from_hf(llm)
        kw = dict(vision=vision, text=text, layout="internvl_chat",
                  downsample_ratio=float(config.get("downsample_ratio", 0.5)),
                  ps_version=config.get("ps_version", "v1"),     # InternVLChatConfig's default is v1
                  select_layer=int(config.get("select_layer", -1)),
                  img_context_token_id=image_token_id, template=config.get("template"), raw=dict(config))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_internvl(cls, config: dict, image_token_id: int | None = None, **overrides) -> "InternVLConfig":
        """From a transformers ``internvl`` config.json (``vision_config`` / ``text_config``)."""
        vision = internvit.config_from_hf(dict(config.get("vision_config") or {}))
        tc = dict(config.get("text_config") or {})
        if config.get("tie_word_embeddings") is not None:   # the composite model decides tying
            tc["tie_word_embeddings"] = config["tie_word_embeddings"]
        text = family_module(tc).config_from_hf(tc)
        layer = config.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise NotImplementedError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise NotImplementedError(f"vision_feature_select_strategy {strategy!r} (only 'default', CLS dropped)")
        tok = config.get("image_token_id", 151667) if image_token_id is None else image_token_id
        kw = dict(vision=vision, text=text, layout="hf", downsample_ratio=float(config.get("downsample_ratio", 0.5)),
                  ps_version="v2", select_layer=layer, img_context_token_id=tok, template=None,
                  projector_act=config.get("projector_hidden_act", "gelu"), raw=dict(config))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dict(cls, config: dict, image_token_id: int | None = None, **overrides) -> "InternVLConfig":
        mt = config.get("model_type")
        if mt == "internvl_chat":
            return cls.from_internvl_chat(config, image_token_id, **overrides)
        if mt in ("internvl", "interns1"):   # Intern-S1's config has transformers InternVL's fields
            return cls.from_hf_internvl(config, image_token_id, **overrides)
        raise ValueError(f"not an InternVL config (model_type {mt!r}; expected internvl_chat, internvl or interns1)")


def canonical_hf_key(key: str) -> str:
    """transformers InternVL tensor names -> the canonical ones of :meth:`InternVL.weight_rules`
    (older / ``save_pretrained``-reverted spellings: ``language_model.model.*``,
    ``language_model.lm_head.*``, ``vision_tower.*``, ``multi_modal_projector.*``)."""
    for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _is_concrete(*xs) -> bool:
    return all(x is None or not isinstance(x, jax.core.Tracer) for x in xs)


def merge_image_features(input_ids: jax.Array, embeds: jax.Array, features: jax.Array | None,
                         image_flags: jax.Array | None, img_context_token_id: int | None
                         ) -> tuple[jax.Array, jax.Array]:
    """Scatter ``features`` (num_tiles, K, H) of the real tiles into the ``<IMG_CONTEXT>`` positions.

    Returns ``(embeds, mismatch)``; ``mismatch`` (bool scalar) is true when the number of context
    positions differs from ``real tiles * K``. On a mismatch the first ``min`` positions are filled
    and the rest keep their token embedding (the caller must discard the batch).
    """
    b, t, h = embeds.shape
    if img_context_token_id is None:
        if features is not None:
            raise ValueError("img_context_token_id is not set: resolve '<IMG_CONTEXT>' with the tokenizer "
                             "and pass it to the config before giving pixel_values")
        return embeds, jnp.zeros((), bool)
    sel = (input_ids == img_context_token_id).reshape(-1)
    n_ctx = jnp.sum(sel.astype(jnp.int32))
    if features is None:
        return embeds, n_ctx != 0
    n, k, _ = features.shape
    flags = jnp.ones((n,), bool) if image_flags is None else (image_flags.reshape(n) != 0)
    order = true_first(flags)                                                     # real tiles first, in order
    feats = features[order].reshape(n * k, h).astype(embeds.dtype)
    n_real = jnp.sum(flags.astype(jnp.int32)) * k
    idx = jnp.cumsum(sel.astype(jnp.int32)) - 1                                  # slot -> feature row
    take = sel & (idx < n_real)
    gathered = jnp.take(feats, jnp.clip(idx, 0, n * k - 1), axis=0)
    flat = embeds.reshape(b * t, h)
    merged = jnp.where(take[:, None], gathered, flat).reshape(b, t, h)
    return merged, n_ctx != n_real


class InternVL(nnx.Module):
    """InternViT + pixel shuffle + ``mlp1`` + a :class:`CausalLM` (``vision_model``, ``mlp1``, ``language_model``)."""

    def __init__(self, cfg: InternVLConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        want = {"internvl_chat": "fused", "hf": "separate"}[cfg.layout]
        if cfg.vision.qkv_layout != want:
            raise ValueError(f"layout {cfg.layout!r} stores the ViT qkv {want}, config says {cfg.vision.qkv_layout}")
        self.cfg, self.dtype = cfg, dtype
        self.vision_model = internvit.InternViT(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp1 = projector.MLPProjector(cfg.vit_out_features, cfg.text.hidden_size, act=cfg.projector_act,
                                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = CausalLM(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # ---- pieces ------------------------------------------------------------------------------

    def extract_features(self, pixel_values: jax.Array, *, deterministic: bool = True,
                         rngs: nnx.Rngs | jax.Array | None = None, real: jax.Array | None = None) -> jax.Array:
        """(num_tiles, H, W, 3) -> (num_tiles, num_image_token, hidden_llm).

        ``real`` (num_tiles,) bool marks the tiles that hold an image; with ``cfg.tile_chunk`` > 0
        the others (a packed batch's empty tile slots) cost no ViT work and get zero features."""
        cfg = self.cfg
        if real is None or cfg.tile_chunk <= 0 or cfg.tile_chunk >= pixel_values.shape[0]:   # one group: no skip
            x = self.vision_model(pixel_values, cfg.select_layer, deterministic=deterministic, rngs=rngs)
            return self.mlp1(projector.pixel_shuffle(x, cfg.downsample_ratio, cfg.ps_version))
        return self._encode_real_tiles(pixel_values, real, deterministic, rngs)

    def _encode_real_tiles(self, pixel_values, real, deterministic, rngs):
        """The tiles, real ones first (a stable order), in groups of ``tile_chunk``; a group past
        the last real tile is skipped (``layers.scan_skipping``: zeros, no ViT or projector work
        forward or backward, static shapes)."""
        cfg = self.cfg
        n = pixel_values.shape[0]
        c = min(cfg.tile_chunk, n)
        order = true_first(real)
        px = pixel_values[order]
        if n % c:
            px = jnp.concatenate([px, jnp.zeros((c - n % c,) + px.shape[1:], px.dtype)])
        groups = px.shape[0] // c
        px = constrain(px.reshape((groups, c) + px.shape[1:]), (None, "tiles", None, None, None))
        active = jnp.arange(groups) * c < jnp.sum(real.astype(jnp.int32))
        keys = None
        if not deterministic and rngs is not None:
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            keys = jax.random.split(key, groups)
        gv, sv = nnx.split(self.vision_model)
        gm, sm = nnx.split(self.mlp1)

        def encode(tiles, key):
            x = nnx.merge(gv, sv)(tiles, cfg.select_layer, deterministic=deterministic, rngs=key)
            return nnx.merge(gm, sm)(projector.pixel_shuffle(x, cfg.downsample_ratio, cfg.ps_version))

        feats = scan_skipping(encode, active, px, keys)
        feats = feats.reshape((groups * c,) + feats.shape[2:])[:n]
        return feats[jnp.argsort(order)]     # back to the slots' order

    def vision_layers_read(self) -> int:
        """ViT layers the image features depend on (layers after ``select_layer`` get no gradient)."""
        return self.vision_model.layers_read(self.cfg.select_layer)

    def check_image_tokens(self, input_ids, pixel_values=None, image_flags=None) -> None:
        """Raise ValueError when the inputs are concrete and the context-token count does not match."""
        if not _is_concrete(input_ids, image_flags):
            return
        tok = self.cfg.img_context_token_id
        n_ctx = 0 if tok is None else int(np.sum(np.asarray(input_ids) == tok))
        if pixel_values is None:
            n_real = 0
        elif image_flags is None:
            n_real = int(pixel_values.shape[0])
        else:
            n_real = int(np.sum(np.asarray(image_flags).reshape(-1) != 0))
        n_feat = n_real * self.cfg.num_image_token
        if n_ctx != n_feat:
            raise ValueError(f"image token mismatch: {n_ctx} <IMG_CONTEXT> tokens in input_ids, but {n_real} real "
                             f"tiles x {self.cfg.num_image_token} tokens per tile = {n_feat} image features")

    def embed_multimodal(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                         image_flags: jax.Array | None = None, *, deterministic: bool = True,
                         rngs: nnx.Rngs | jax.Array | None = None, check: bool = True
                         ) -> tuple[jax.Array, jax.Array]:
        """Token embeddings with the image features scattered in: ``(embeds (B,T,H), image_token_mismatch)``.

        With ``check`` (default) and concrete inputs a count mismatch raises ValueError."""
        if pixel_values is not None and pixel_values.shape[0] == 0:
            pixel_values, image_flags = None, None
        if pixel_values is not None and self.cfg.img_context_token_id is None:
            raise ValueError("img_context_token_id is not set: resolve '<IMG_CONTEXT>' with the tokenizer and "
                             "set it in the config (dataclasses.replace) before passing pixel_values")
        if check:
            self.check_image_tokens(input_ids, pixel_values, image_flags)
        embeds = self.language_model.embed(input_ids)
        feats = None
        if pixel_values is not None:
            real = None if image_flags is None else image_flags.reshape(-1) != 0
            feats = self.extract_features(pixel_values, deterministic=deterministic, rngs=rngs, real=real)
        return merge_image_features(input_ids, embeds, feats, image_flags, self.cfg.img_context_token_id)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_flags=None, segment_ids=None,
                      positions=None, *, deterministic: bool = True, rngs=None, check: bool = True
                      ) -> tuple[jax.Array, jax.Array]:
        """Final-normed LLM hidden states (B, T, H) and the ``image_token_mismatch`` flag (for chunked CE)."""
        embeds, mismatch = self.embed_multimodal(input_ids, pixel_values, image_flags, deterministic=deterministic,
                                                 rngs=rngs, check=check)
        seg, pos = default_segments(input_ids.shape, attention_mask, segment_ids, positions)
        hidden, _ = self.language_model.decode_embeds(embeds, seg, pos)
        return hidden, mismatch

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_flags=None, segment_ids=None,
                positions=None, *, deterministic: bool = True, rngs=None, check: bool = True
                ) -> tuple[jax.Array, jax.Array]:
        """jit-friendly: ``(logits (B,T,V) float32, image_token_mismatch bool scalar)``."""
        hidden, mismatch = self.hidden_states(input_ids, attention_mask, pixel_values, image_flags, segment_ids,
                                              positions, deterministic=deterministic, rngs=rngs, check=check)
        return self.language_model.logits(hidden), mismatch

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_flags=None, segment_ids=None,
                 positions=None, *, deterministic: bool = True, rngs=None) -> jax.Array:
        """Logits (B, T, V) float32. A context-token count mismatch raises (eager) or gives NaN logits (traced)."""
        logits, mismatch = self.forward(input_ids, attention_mask, pixel_values, image_flags, segment_ids, positions,
                                        deterministic=deterministic, rngs=rngs, check=True)
        return jnp.where(mismatch, jnp.nan, logits)

    # ---- generation ----------------------------------------------------------------------------

    def prefill_embeddings(self, input_ids, pixel_values=None, image_flags=None) -> jax.Array:
        """Prompt embeddings with images merged (counts checked), for ``generation.generate``."""
        embeds, mismatch = self.embed_multimodal(input_ids, pixel_values, image_flags)
        return jnp.where(mismatch, jnp.nan, embeds)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_flags=None, **kwargs):
        """``(ids (B, max_new_tokens), lengths (B,))``; kwargs as ``mmjax.models.generation.generate``."""
        from mmjax.models.generation import generate
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
        return generate(self.language_model, self.prefill_embeddings(input_ids, pixel_values, image_flags), mask,
                        **kwargs)

    # ---- weights -------------------------------------------------------------------------------

    @property
    def hf_layout(self) -> str:
        """The loader / saver's name of this layout (``internvl_chat`` | ``internvl_hf``)."""
        return {"internvl_chat": "internvl_chat", "hf": "internvl_hf"}[self.cfg.layout]

    def hf_config(self) -> dict:
        return dict(self.cfg.raw)

    def weight_rules(self) -> list[TensorRule]:
        """Full HF keys of this layout, paths from the InternVL module."""
        layout = self.cfg.layout
        vit = internvit.weight_rules(self.cfg.vision, layout)
        proj = projector.weight_rules(layout)
        lm = self.language_model.weight_rules()
        if layout == "internvl_chat":
            return ([r.with_prefix("vision_model.", ("vision_model",)) for r in vit]
                    + [r.with_prefix("mlp1.", ("mlp1",)) for r in proj]
                    + [r.with_prefix("language_model.", ("language_model",)) for r in lm])
        out = ([r.with_prefix("model.vision_tower.", ("vision_model",)) for r in vit]
               + [r.with_prefix("model.multi_modal_projector.", ("mlp1",)) for r in proj])
        for r in lm:
            key = "model.language_model." + r.hf_key[len("model."):] if r.hf_key.startswith("model.") else r.hf_key
            out.append(dataclasses.replace(r, hf_key=key, path=("language_model",) + r.path))
        return out

    def num_layers_map(self) -> dict[tuple[str, ...], int]:
        out = {("vision_model", "layers"): self.cfg.vision.num_layers}
        out.update({("language_model",) + k: v for k, v in self.language_model.num_layers_map().items()})
        return out
