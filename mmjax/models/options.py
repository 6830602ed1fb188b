"""Run-time model options: the choices a training run makes that no checkpoint's config.json holds.

``ModelOptions`` is the one typed path by which remat, the attention backends and their block, ViT
drop path and the ``<IMG_CONTEXT>`` token id reach a model: ``from_pretrained(..., options=)`` and
``weights.layouts.model_factory(..., options=)`` apply it to the family configs they read, and it
validates every field once, when it is built (the trainer builds it from ``config.model``).
``None`` keeps what the checkpoint's config says (or the family's default).
"""

from __future__ import annotations

import dataclasses

from mmjax.models.attention import BACKENDS
from mmjax.models.layers import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    remat: str | None = None                 # a policy in layers.REMAT_POLICIES, for every layer stack
    attention: str | None = None             # the decoder's backend (attention.BACKENDS)
    attention_block: int | None = None       # query / key tile of tiled backends (decoder and ViT)
    token_chunk: int | None = None           # decoder tokens per chunk of per-token work; padding chunks skipped
    vit_attention: str | None = None         # the ViT's backend over its tiles (attention.BACKENDS)
    vit_attention_block: int | None = None   # the ViT's tile bound (0: a whole image tile in one block)
    vit_tile_chunk: int | None = None        # tiles a ViT call encodes; empty tile slots skipped (0: all in one)
    drop_path_rate: float | None = None      # InternViT stochastic depth (training only)
    plora_dropout: float | None = None       # XComposer2's partial-LoRA input dropout (training only)
    img_context_token_id: int | None = None  # the id the data pipeline writes for image slots

    def __post_init__(self):
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        if self.attention is not None and self.attention not in BACKENDS:
            raise ValueError(f"attention={self.attention!r}: choose one of {sorted(BACKENDS)}")
        if self.vit_attention is not None and self.vit_attention not in BACKENDS:
            raise ValueError(f"vit_attention={self.vit_attention!r}: choose one of {sorted(BACKENDS)}")
        if self.vit_attention_block is not None and (not _is_int(self.vit_attention_block)
                                                     or self.vit_attention_block < 0):
            raise ValueError(f"vit_attention_block={self.vit_attention_block!r}: must be an integer >= 0")
        if self.token_chunk is not None and (not _is_int(self.token_chunk) or self.token_chunk < 0):
            raise ValueError(f"token_chunk={self.token_chunk!r}: must be an integer >= 0")
        if self.vit_tile_chunk is not None and (not _is_int(self.vit_tile_chunk) or self.vit_tile_chunk < 0):
            raise ValueError(f"vit_tile_chunk={self.vit_tile_chunk!r}: must be an integer >= 0")
        if self.attention_block is not None and (not _is_int(self.attention_block) or self.attention_block < 1):
            raise ValueError(f"attention_block={self.attention_block!r}: must be an integer >= 1")
        if self.drop_path_rate is not None and not 0.0 <= float(self.drop_path_rate) < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate!r}: must be in [0, 1)")
        if self.plora_dropout is not None and not 0.0 <= float(self.plora_dropout) < 1.0:
            raise ValueError(f"plora_dropout={self.plora_dropout!r}: must be in [0, 1)")
        if self.img_context_token_id is not None and (not _is_int(self.img_context_token_id)
                                                      or self.img_context_token_id < 0):
            raise ValueError(f"img_context_token_id={self.img_context_token_id!r}: must be a token id >= 0")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "ModelOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, options: "ModelOptions | None", kwargs: dict) -> tuple["ModelOptions", dict]:
        """``options`` with any of its fields found in ``kwargs`` (the keyword form of the API:
        ``from_pretrained(path, remat="full")``), and the keywords left over."""
        rest = dict(kwargs)
        knobs = {k: rest.pop(k) for k in cls.fields() if k in rest}
        return (options or cls()).replace(**knobs), rest

    def apply_text(self, cfg):
        """A decoder config (``DecoderConfig``) with these options."""
        kw = {k: getattr(self, k) for k in ("remat", "attention", "attention_block", "token_chunk", "plora_dropout")
              if getattr(self, k) is not None}
        return dataclasses.replace(cfg, **kw) if kw else cfg

    def apply_internvl(self, cfg):
        """An ``InternVLConfig`` with these options on its ViT, its decoder and its tile batching."""
        kw = dict(vision=self.apply_vision(cfg.vision), text=self.apply_text(cfg.text))
        if self.vit_tile_chunk is not None:
            kw["tile_chunk"] = int(self.vit_tile_chunk)
        return dataclasses.replace(cfg, **kw)

    def apply_xcomposer2(self, cfg):
        """An ``XComposer2Config`` with these options on its ViT, its decoder and its tile batching."""
        return self.apply_internvl(cfg)

    def apply_vision(self, cfg):
        """A ViT config (``InternViTConfig``) with these options."""
        kw = {}
        if self.vit_attention is not None:
            kw["attention"] = self.vit_attention
        if self.vit_attention_block is not None:
            kw["attention_block"] = int(self.vit_attention_block)
        if self.remat is not None:
            kw["remat"] = self.remat
        if self.drop_path_rate is not None:
            kw["drop_path_rate"] = float(self.drop_path_rate)
        return dataclasses.replace(cfg, **kw) if kw else cfg


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
