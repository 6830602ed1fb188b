"""One generic pre-norm decoder (RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU -> residual)
that every supported LLM family configures: InternLM2, Phi-3, Qwen2, Qwen3, Llama.

The family files (``internlm2.py``, ``phi3.py``, ``qwen3.py``, ``llama.py``) read an HF config into a
:class:`DecoderConfig` and list the HF <-> mmjax tensor rules. Parameters keep the checkpoint's fusion
(``qkv_layout`` / ``mlp_layout``); the split is a reshape in the forward pass.

Packed rows: ``segment_ids`` (0 = padding) and ``positions`` (restarting per sample) drive both the
attention mask and the rotary tables, so a packed row computes what each sample computes alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models import attention as attn_lib
from mmjax.models.layers import (REMAT_POLICIES, Dense, KVCache, RMSNorm, RopeConfig, active_token_chunks,
                                 add_partial_lora, apply_rope, cache_write, init_kv_cache, map_token_chunks, normal_init, param,
                                 positions_from_mask, rope_cos_sin, scan_layers, stacked, swiglu, token_matmul)
from mmjax.sharding import constrain

QKV_LAYOUTS = ("separate", "fused", "internlm2")
MLP_LAYOUTS = ("separate", "fused_gate_up")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    qkv_layout: str = "separate"     # separate | fused ([Q|K|V], Phi-3) | internlm2 (grouped per KV head)
    mlp_layout: str = "separate"     # separate | fused_gate_up ([gate|up], Phi-3)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False            # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    tie_word_embeddings: bool = False
    remat: str = "none"              # a name in layers.REMAT_POLICIES
    attention: str = "xla"           # a backend name in attention.BACKENDS (full forward; the KV cache uses xla)
    attention_block: int = 512       # blockwise backend tile (query and key); ~ the typical packed sample
    # a full forward pass runs each layer's per-token work (norms, projections, MLP) in chunks of
    # this many tokens and skips the chunks that hold only padding (0: the whole row at once)
    token_chunk: int = 0
    init_std: float = 0.02
    # InternLM-XComposer2's partial LoRA: (projection, rank, scaling) for each projection that adds
    # scaling * x A B at image-token positions (projection names as in this module: qkv_proj,
    # o_proj, gate_proj, up_proj, down_proj); part of the base model, trained with it in full
    # fine-tuning. Ranks and scalings differ per projection in IXC2-4KHD (wqkv 8 / 2.0, others 256 / 1.0)
    plora: tuple[tuple[str, int, float], ...] = ()
    plora_dropout: float = 0.0       # on the partial-LoRA input while training (upstream's class default 0.05)

    def __post_init__(self):
        if self.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout {self.qkv_layout!r} not in {QKV_LAYOUTS}")
        if self.mlp_layout not in MLP_LAYOUTS:
            raise ValueError(f"mlp_layout {self.mlp_layout!r} not in {MLP_LAYOUTS}")
        attn_lib.get_backend(self.attention)   # raises naming the registered backends
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        if not isinstance(self.token_chunk, int) or self.token_chunk < 0:
            raise ValueError(f"token_chunk must be an integer >= 0, got {self.token_chunk!r}")
        known = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                 "down_proj")
        for entry in self.plora:
            if len(entry) != 3 or entry[0] not in known or int(entry[1]) < 1:
                raise ValueError(f"plora entry {entry!r}: expected (projection in {known}, rank >= 1, scaling)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _add_partial_loras(module: nnx.Module, cfg: DecoderConfig, rngs, param_dtype) -> None:
    """The partial-LoRA branches ``cfg.plora`` names on the projections this module holds."""
    for name, rank, scaling in cfg.plora:
        if hasattr(module, name):
            add_partial_lora(getattr(module, name), int(rank), float(scaling), rngs=rngs, param_dtype=param_dtype,
                             init_std=cfg.init_std, dropout=cfg.plora_dropout)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std, rngs=rngs)
        h = cfg.hidden_size
        if cfg.qkv_layout == "separate":
            self.q_proj = Dense(h, cfg.q_dim, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
            self.k_proj = Dense(h, cfg.kv_dim, axes=("embed", "kv"), use_bias=cfg.qkv_bias, **kw)
            self.v_proj = Dense(h, cfg.kv_dim, axes=("embed", "kv"), use_bias=cfg.qkv_bias, **kw)
        else:
            self.qkv_proj = Dense(h, cfg.q_dim + 2 * cfg.kv_dim, axes=("embed", "heads"),
                                  use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense(cfg.q_dim, h, axes=("heads", "embed"), use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, axis_name=None, param_dtype=param_dtype)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, axis_name=None, param_dtype=param_dtype)
        _add_partial_loras(self, cfg, rngs, param_dtype)

    def qkv(self, x: jax.Array, image_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, _ = x.shape
        d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        if cfg.qkv_layout == "separate":
            q, k, v = self.q_proj(x, image_mask), self.k_proj(x, image_mask), self.v_proj(x, image_mask)
        elif cfg.qkv_layout == "fused":
            y = self.qkv_proj(x, image_mask)
            q, k, v = y[..., :cfg.q_dim], y[..., cfg.q_dim:cfg.q_dim + cfg.kv_dim], y[..., cfg.q_dim + cfg.kv_dim:]
        else:  # internlm2: rows grouped per KV head as [q_{kG} .. q_{kG+G-1}, k_k, v_k]
            g = hq // hkv
            y = self.qkv_proj(x, image_mask).reshape(b, t, hkv, g + 2, d)
            q, k, v = y[:, :, :, :g], y[:, :, :, g], y[:, :, :, g + 1]
        return q.reshape(b, t, hq, d), k.reshape(b, t, hkv, d), v.reshape(b, t, hkv, d)

    def project(self, x, cos, sin, image_mask=None):
        """Per token: q, k, v with the q / k norms and the rotary embedding applied."""
        q, k, v = self.qkv(x, image_mask)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        k = constrain(k, ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, prepared):
        """The full forward pass's attention through the configured backend: (B, T, q_dim)."""
        out = attn_lib.get_backend(self.cfg.attention).attend(q, k.astype(q.dtype), v.astype(q.dtype), prepared,
                                                             scale=self.cfg.head_dim ** -0.5,
                                                             block=self.cfg.attention_block)
        return out.reshape(out.shape[:2] + (-1,))

    def __call__(self, x, cos, sin, prepared, kv=None, index=None, image_mask=None):
        """``prepared``: the backend's per-forward object (``attention.Backend.prepare``) for a full
        forward pass, or, with a KV cache (``kv``), the dense (B, 1, T, S) mask over the cache."""
        q, k, v = self.project(x, cos, sin, image_mask)
        if kv is None:
            return self.o_proj(self.attend(q, k, v, prepared), image_mask), kv
        k = cache_write(kv[0], k, index)
        v = cache_write(kv[1], v, index)
        out = attn_lib.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), prepared,
                                             scale=self.cfg.head_dim ** -0.5)
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b, t, -1), image_mask), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std, use_bias=cfg.mlp_bias, rngs=rngs)
        h, i = cfg.hidden_size, cfg.intermediate_size
        if cfg.mlp_layout == "separate":
            self.gate_proj = Dense(h, i, axes=("embed", "mlp"), **kw)
            self.up_proj = Dense(h, i, axes=("embed", "mlp"), **kw)
        else:
            self.gate_up_proj = Dense(h, 2 * i, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(i, h, axes=("mlp", "embed"), **kw)
        _add_partial_loras(self, cfg, rngs, param_dtype)

    def __call__(self, x, image_mask=None):
        if self.cfg.mlp_layout == "separate":
            gate, up = self.gate_proj(x, image_mask), self.up_proj(x, image_mask)
        else:
            y = self.gate_up_proj(x, image_mask)
            gate, up = y[..., :self.cfg.intermediate_size], y[..., self.cfg.intermediate_size:]
        axes = ("batch", "seq", "act_mlp")
        return self.down_proj(swiglu(constrain(gate, axes), constrain(up, axes)), image_mask)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, image_mask=None):
        a, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, index, image_mask)
        x = x + a.astype(x.dtype)
        x = x + self.mlp(self.post_attention_norm(x), image_mask).astype(x.dtype)
        return x, kv

    def forward_chunked(self, x, cos, sin, prepared, active, chunk: int, image_mask=None):
        """The full forward pass with the per-token work in token chunks, the chunks ``active``
        marks as padding-only skipped (their outputs zeros: nothing reads a padding position)."""
        masks = () if image_mask is None else (image_mask,)    # chunked with the tokens when given

        def project(xc, cc, sc, *mc):
            return self.attn.project(self.input_norm(xc), cc, sc, *mc)

        def rest(xc, ac, *mc):
            m = mc[0] if mc else None
            h = xc + self.attn.o_proj(ac, m).astype(xc.dtype)
            return h + self.mlp(self.post_attention_norm(h), m).astype(h.dtype)

        q, k, v = map_token_chunks(project, active, chunk, x, cos, sin, *masks)
        return map_token_chunks(rest, active, chunk, x, self.attn.attend(q, k, v, prepared), *masks)


class CausalLM(nnx.Module):
    """Decoder-only LM: ``embed`` -> ``decode_embeds`` (scanned layers + final norm) -> ``logits``."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.embed_tokens = param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.init_std, param_dtype),
                                  ("vocab", "embed"))
        self.layers = stacked(lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                              cfg.num_layers, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(normal_init(rngs, (cfg.hidden_size, cfg.vocab_size), cfg.init_std, param_dtype),
                                 ("embed", "vocab"))

    # ---- pieces used by the multimodal composition and generation --------------------------------

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.cfg
        return init_kv_cache(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim,
                             self.dtype if dtype is None else dtype)

    def decode_embeds(self, embeds: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                      cache: KVCache | None = None, image_mask: jax.Array | None = None
                      ) -> tuple[jax.Array, KVCache | None]:
        """Run the layers on ``embeds`` (B, T, H). With ``cache`` the T new tokens are written at
        ``cache.index`` and attend to every cached slot of their segment; returns the final-normed
        hidden states and the updated cache (None without a cache). ``image_mask`` (B, T) marks the
        image-token positions for a partial-LoRA decoder (``cfg.plora_rank``)."""
        if not self.cfg.plora:
            image_mask = None
        cfg = self.cfg
        segment_ids = segment_ids.astype(jnp.int32)
        positions = positions.astype(jnp.int32)
        cos, sin = rope_cos_sin(cfg.rope, positions, segment_ids)
        hidden_axes = ("batch", "seq", "act_embed")
        x = constrain(embeds.astype(self.dtype), hidden_axes)
        if cache is None:
            mask = attn_lib.get_backend(cfg.attention).prepare(segment_ids, positions)
            active = active_token_chunks(segment_ids, cfg.token_chunk) if cfg.token_chunk else None

            def body(layer, h, _):
                if active is not None:
                    return constrain(layer.forward_chunked(h, cos, sin, mask, active, cfg.token_chunk, image_mask),
                                     hidden_axes), None
                h, _ = layer(h, cos, sin, mask, image_mask=image_mask)
                return constrain(h, hidden_axes), None

            x, _ = scan_layers(self.layers, body, x, None, remat=cfg.remat)
            return self.final_norm(x), None

        index = cache.index  # KV-cache path: always the xla backend (dense mask over the cache)
        kv_seg = cache_write(cache.segment_ids, segment_ids, index)
        kv_pos = cache_write(cache.positions, positions, index)
        mask = attn_lib.attention_mask(segment_ids, kv_seg, positions, kv_pos, causal=True)

        def body_cached(layer, h, kv):
            h, kv = layer(h, cos, sin, mask, kv, index, image_mask)
            return h, kv

        x, (k, v) = scan_layers(self.layers, body_cached, x, (cache.k, cache.v), remat=cfg.remat)
        new_cache = KVCache(k=k, v=v, segment_ids=kv_seg, positions=kv_pos,
                            index=index + jnp.asarray(embeds.shape[1], jnp.int32))
        return self.final_norm(x), new_cache

    def output_head(self) -> tuple[jax.Array, bool]:
        """The output projection in the compute dtype and whether it is stored (vocab, hidden)
        (a tied input embedding) rather than (hidden, vocab)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens[...].astype(self.dtype), True
        return self.lm_head[...].astype(self.dtype), False

    def logits(self, hidden: jax.Array) -> jax.Array:
        w, transposed = self.output_head()
        return token_matmul(hidden.astype(self.dtype), w, transpose_w=transposed, preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 **unused: Any) -> jax.Array:
        segment_ids, positions = default_segments(input_ids.shape, attention_mask, segment_ids, positions)
        hidden, _ = self.decode_embeds(self.embed(input_ids), segment_ids, positions)
        return self.logits(hidden)

    # ---- weights -----------------------------------------------------------------------------------

    def weight_rules(self):
        """HF <-> mmjax rules with the keys of the family's plain causal-LM checkpoint."""
        from mmjax.models.families import family_module
        return family_module(self.cfg.family).weight_rules(self.cfg)

    def num_layers_map(self) -> dict[tuple[str, ...], int]:
        return {("layers",): self.cfg.num_layers}


def default_segments(shape, attention_mask=None, segment_ids=None, positions=None):
    """segment_ids / positions from what the caller gave: explicit packing, an attention mask
    (1 = real token, left or right padding), or nothing (one full segment)."""
    b, t = shape[:2]
    if segment_ids is None:
        if attention_mask is not None:
            segment_ids = attention_mask.astype(jnp.int32)
        else:
            segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
        if attention_mask is not None:
            positions = positions_from_mask(attention_mask)
        else:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return segment_ids.astype(jnp.int32), positions.astype(jnp.int32)


# ---- HF config helpers shared by the family files ----------------------------------------------------


def hf_rope_params(hf: dict) -> dict:
    """The rope settings of an HF config dict in one flat dict: transformers 5 ``rope_parameters``
    over the legacy ``rope_scaling`` (``type`` -> ``rope_type``), with ``rope_theta`` folded in."""
    legacy = dict(hf.get("rope_scaling") or {})
    params = {**legacy, **dict(hf.get("rope_parameters") or {})}
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", hf.get("rope_theta"))
    if "partial_rotary_factor" not in params and hf.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = hf["partial_rotary_factor"]
    return params


def rope_from_hf(hf: dict, head_dim: int, default_theta: float = 10000.0) -> RopeConfig:
    """RopeConfig for the kinds default | linear | dynamic | llama3 | longrope ('su')."""
    p = hf_rope_params(hf)
    kind = p.get("rope_type") or "default"
    kind = {"su": "longrope"}.get(kind, kind)
    theta = float(p.get("rope_theta") or default_theta)
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    prf = float(p.get("partial_rotary_factor") or 1.0)
    rotary_dim = int(head_dim * prf)
    rotary_dim = None if rotary_dim == head_dim else rotary_dim
    common = dict(head_dim=head_dim, theta=theta, max_position_embeddings=max_pos, rotary_dim=rotary_dim)
    if kind == "default":
        return RopeConfig(kind="default", **common)
    if kind in ("linear", "dynamic"):
        return RopeConfig(kind=kind, factor=float(p["factor"]), **common)
    if kind == "llama3":
        return RopeConfig(kind="llama3", factor=float(p["factor"]),
                          original_max_position_embeddings=int(p["original_max_position_embeddings"]),
                          low_freq_factor=float(p["low_freq_factor"]),
                          high_freq_factor=float(p["high_freq_factor"]), **common)
    if kind == "longrope":
        # A top-level original_max_position_embeddings (Phi-3 config.json) wins, as in transformers.
        orig = int(hf.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
                   or max_pos)
        factor = p.get("factor")
        factor = max_pos / orig if factor is None else float(factor)
        attn = p.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        n = (rotary_dim or head_dim) // 2
        short, long = tuple(float(x) for x in p["short_factor"]), tuple(float(x) for x in p["long_factor"])
        if len(short) != n or len(long) != n:
            raise ValueError(f"longrope short/long factors need {n} entries, got {len(short)}/{len(long)}")
        return RopeConfig(kind="longrope", factor=factor, original_max_position_embeddings=orig,
                          short_factor=short, long_factor=long, attention_factor=float(attn), **common)
    raise NotImplementedError(f"rope type {kind!r} is not supported (default, linear, dynamic, llama3, "
                              f"longrope/su)")


def hf_get(hf: dict, *names, default=None):
    """First present, non-None value among ``names`` in the HF config dict."""
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return default
