"""Independent PyTorch reference for the InternLM-XComposer2 family (test helper).

Written from the upstream behaviour as documented (see the facts notes in the report that
accompanies this file), not from mmjax's JAX code. It provides

- ``write_tiny_checkpoint``: a tiny random checkpoint directory (``config.json`` with the upstream
  fields + ``model.safetensors`` in the upstream key layout) for four variants:

  ===========  ==================================================================================
  ``plain``    IXC2-7B style: fixed square ``img_size`` (224 upstream), CLIP positions resized to
               ``img_size/patch`` per side (24 -> 16 upstream), no patch merge, no separators.
  ``vl490``    IXC2-VL-7B style: same as plain with a larger ``img_size`` (490 upstream, 24 -> 35).
  ``hd``       IXC2-4KHD style: HD grid of ``crop`` px crops (336 upstream) + a global view,
               2x2 patch merge, ``plora_glb_GN`` / ``plora_sub_GN`` separators; the wqkv PLoRA has
               its own rank and scaling 2.0 (r 8 / alpha 16 upstream).
  ``hd25``     IXC2.5 style: as ``hd`` (560 px crops upstream), every PLoRA scaling 1.0, plus the
               unused task LoRAs ``lora_{web,sft,dpo}_{A,B}`` inside each PLoRA module.
  ===========  ==================================================================================

- ``IXC2Reference`` / ``load_reference`` / ``reference_logits``: a float32 forward of the full model
  (CLIP features of the last encoder layer without the CLS token, position-table resize, 2x2 merge,
  separator layout, projector, interleaving, InternLM2 decoder with PLoRA at image positions).
- ``hd_transform_reference`` / ``plain_transform_reference`` / ``hd_token_count``: the image
  preprocessing (PIL-only; no torchvision).
- ``conv2text_reference`` / ``wrap_training_sample`` / ``mask_human_targets_reference`` /
  ``shifted_ce_loss``: the training-time text side.

Besides the upstream ``config.json`` fields the tiny checkpoint carries a ``vision_config`` block
(CLIP fields; real IXC2 configs have none - the ViT there is a hard-coded CLIP ViT-L/14) and a side
file ``ixc_reference.json`` with the variant, crop size and PLoRA scalings (in real checkpoints the
scalings are hard-coded in the modelling code and the variant follows from the model name).
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

VARIANTS = ("plain", "vl490", "hd", "hd25")
HD_VARIANTS = ("hd", "hd25")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IM_START_ID = 92543      # [UNUSED_TOKEN_146] = <|im_start|> in the real InternLM2 vocabulary
IM_END_ID = 92542        # [UNUSED_TOKEN_145] = <|im_end|>
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2
PLORA_MODULES = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
TASK_LORAS = ("lora_web", "lora_sft", "lora_dpo")
VIT_PREFIX = "vit.vision_tower.vision_model."


# --------------------------------------------------------------------------------------------
# checkpoint writer
# --------------------------------------------------------------------------------------------

def plora_scalings(variant: str) -> dict[str, float]:
    """lora_alpha / lora_r per PLoRA module, as hard-coded upstream for the real models."""
    if variant not in VARIANTS:
        raise ValueError(variant)
    scal = {m: 1.0 for m in PLORA_MODULES}
    if variant == "hd":
        scal["attention.wqkv"] = 2.0
    return scal


def _default_img_size(variant: str, patch: int, vit_image_size: int) -> int:
    base = vit_image_size // patch
    if variant == "plain":          # 24 -> 16 upstream: shrink the grid
        return max(1, base // 2) * patch
    if variant == "vl490":          # 24 -> 35 upstream: grow it
        return (base + 1) * patch
    return vit_image_size           # HD variants: crops at the ViT's native size


def write_tiny_checkpoint(out_dir: str, variant: str, seed: int = 0, *, vocab_size: int = 1000,
                          hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                          num_key_value_heads: int = 2, intermediate_size: int = 128, plora_r: int = 8,
                          qkv_plora_r: int | None = None, vit_hidden: int = 32, vit_layers: int = 2,
                          vit_heads: int = 2, vit_intermediate: int = 64, patch_size: int = 14,
                          vit_image_size: int = 56, img_size: int | None = None, crop: int | None = None,
                          max_position_embeddings: int = 512, rope_theta: float = 1000000.0,
                          rope_scaling: dict | None = None, rms_norm_eps: float = 1e-5, max_length: int = 4096,
                          bias: bool = False, store_resized_pos: bool = True, task_lora_r: int = 4,
                          with_task_loras: bool | None = None, vision_config_key: str | None = "vision_config",
                          gn_scale: float = 0.5) -> str:
    """Write ``config.json``, ``model.safetensors`` and ``ixc_reference.json`` to ``out_dir``.

    ``vit_image_size`` is the ViT's native size (336 upstream; its position table has
    ``(vit_image_size/patch)**2 + 1`` rows). Non-HD variants see ``img_size`` px images (default: a
    smaller grid for ``plain``, a larger one for ``vl490``); with ``store_resized_pos`` (what the real
    checkpoints do) the table is stored already resized to ``img_size``, otherwise the native table is
    stored and the reference resizes it at load time like upstream ``resize_pos``. HD variants cut
    ``crop`` px crops (default ``vit_image_size``; must equal it, and ``crop/patch`` must be even).
    ``qkv_plora_r`` defaults to ``plora_r // 2`` for ``hd`` (the 4KHD wqkv rank differs) and to
    ``plora_r`` otherwise. ``with_task_loras`` defaults to True for ``hd25`` only.
    All weights are random and nonzero (PLoRA A and B both, separators too) so every part matters.
    """
    import torch
    from safetensors.torch import save_file

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    hd = variant in HD_VARIANTS
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size % heads and heads % kv_heads must be 0")
    head_dim = hidden_size // num_attention_heads
    if qkv_plora_r is None:
        qkv_plora_r = max(1, plora_r // 2) if variant == "hd" else plora_r
    if with_task_loras is None:
        with_task_loras = variant == "hd25"
    if hd:
        crop = vit_image_size if crop is None else crop
        if crop != vit_image_size:
            raise ValueError("HD crops are fed to the ViT at its native size: crop must equal vit_image_size")
        if (crop // patch_size) % 2 or crop % patch_size:
            raise ValueError("crop/patch must be an even integer (2x2 merge)")
        img_size = None
    else:
        img_size = _default_img_size(variant, patch_size, vit_image_size) if img_size is None else img_size
        if img_size % patch_size:
            raise ValueError("img_size must be a multiple of patch_size")

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        r = torch.randn(*shape, generator=g, dtype=torch.float32)
        if scale is None:   # unit fan-in scale for matrices
            scale = 1.0 / math.sqrt(shape[-1]) if len(shape) >= 2 else 1.0
        return (r * scale).contiguous()

    def norm_w(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g)).contiguous()

    t: dict[str, torch.Tensor] = {}
    H, I, V = hidden_size, intermediate_size, vocab_size
    qkv_out = (num_attention_heads + 2 * num_key_value_heads) * head_dim
    t["model.tok_embeddings.weight"] = rnd(V, H, scale=1.0)
    shapes = {"attention.wqkv": (qkv_out, H), "attention.wo": (H, num_attention_heads * head_dim),
              "feed_forward.w1": (I, H), "feed_forward.w3": (I, H), "feed_forward.w2": (H, I)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "attention_norm.weight"] = norm_w(H)
        t[p + "ffn_norm.weight"] = norm_w(H)
        for mod, (out_f, in_f) in shapes.items():
            r = qkv_plora_r if mod == "attention.wqkv" else plora_r
            t[p + mod + ".weight"] = rnd(out_f, in_f)
            if bias and mod.startswith("attention."):
                t[p + mod + ".bias"] = rnd(out_f, scale=0.02)
            t[p + mod + ".Plora_A.weight"] = rnd(r, in_f)
            t[p + mod + ".Plora_B.weight"] = rnd(out_f, r)
            if with_task_loras:
                for name in TASK_LORAS:
                    t[p + mod + f".{name}_A.weight"] = rnd(task_lora_r, in_f)
                    t[p + mod + f".{name}_B.weight"] = rnd(out_f, task_lora_r)
    t["model.norm.weight"] = norm_w(H)
    t["output.weight"] = rnd(V, H)

    # vision tower: transformers' CLIP layout under the upstream prefix
    C = vit_hidden
    native_side = vit_image_size // patch_size
    pos_side = (img_size // patch_size) if (not hd and store_resized_pos) else native_side
    t[VIT_PREFIX + "embeddings.class_embedding"] = rnd(C, scale=0.5)
    t[VIT_PREFIX + "embeddings.patch_embedding.weight"] = rnd(C, 3, patch_size, patch_size,
                                                              scale=1.0 / math.sqrt(3 * patch_size ** 2))
    if not hd and store_resized_pos and pos_side != native_side:
        native = rnd(native_side ** 2 + 1, C, scale=0.5)
        t[VIT_PREFIX + "embeddings.position_embedding.weight"] = resize_pos_embed(native, pos_side)
    else:
        t[VIT_PREFIX + "embeddings.position_embedding.weight"] = rnd(pos_side ** 2 + 1, C, scale=0.5)
    t[VIT_PREFIX + "pre_layrnorm.weight"] = norm_w(C)
    t[VIT_PREFIX + "pre_layrnorm.bias"] = rnd(C, scale=0.02)
    for j in range(vit_layers):
        p = VIT_PREFIX + f"encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"] = rnd(C, C)
            t[p + f"self_attn.{proj}.bias"] = rnd(C, scale=0.02)
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + ln + ".weight"] = norm_w(C)
            t[p + ln + ".bias"] = rnd(C, scale=0.02)
        t[p + "mlp.fc1.weight"] = rnd(vit_intermediate, C)
        t[p + "mlp.fc1.bias"] = rnd(vit_intermediate, scale=0.02)
        t[p + "mlp.fc2.weight"] = rnd(C, vit_intermediate)
        t[p + "mlp.fc2.bias"] = rnd(C, scale=0.02)
    # (no post_layernorm: the released checkpoints do not contain it and it is unused)

    mm_in = 4 * C if hd else C
    t["vision_proj.0.weight"] = rnd(H, mm_in)
    t["vision_proj.0.bias"] = rnd(H, scale=0.02)
    t["vision_proj.2.weight"] = rnd(H, H)
    t["vision_proj.2.bias"] = rnd(H, scale=0.02)
    if hd:
        t["plora_glb_GN"] = rnd(1, 1, 4 * C, scale=gn_scale)
        t["plora_sub_GN"] = rnd(1, 1, 1, 4 * C, scale=gn_scale)

    os.makedirs(out_dir, exist_ok=True)
    save_file(t, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    cfg = {
        "architectures": ["InternLMXComposer2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
            "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
        },
        "model_type": "internlm2",
        "attn_implementation": "eager",
        "bias": bias,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": I,
        "max_length": max_length,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "vocab_size": V,
    }
    if img_size is not None:
        cfg["img_size"] = img_size
    if vision_config_key:
        cfg[vision_config_key] = {
            "model_type": "clip_vision_model", "hidden_size": C, "intermediate_size": vit_intermediate,
            "num_hidden_layers": vit_layers, "num_attention_heads": vit_heads, "patch_size": patch_size,
            "image_size": vit_image_size, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "num_channels": 3}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    side = {
        "variant": variant, "hd": hd, "crop": crop, "img_size": img_size, "vit_image_size": vit_image_size,
        "patch_size": patch_size, "vit_hidden": C, "vit_layers": vit_layers, "vit_heads": vit_heads,
        "vit_intermediate": vit_intermediate, "plora_scaling": plora_scalings(variant),
        "plora_r": plora_r, "qkv_plora_r": qkv_plora_r, "store_resized_pos": store_resized_pos,
        "with_task_loras": with_task_loras,
        "tokens_per_image": None if hd else (img_size // patch_size) ** 2,
        "crop_tokens_side": (crop // patch_size) // 2 if hd else None,
    }
    with open(os.path.join(out_dir, "ixc_reference.json"), "w") as f:
        json.dump(side, f, indent=2)
    return out_dir


# --------------------------------------------------------------------------------------------
# vision helpers
# --------------------------------------------------------------------------------------------

def resize_pos_embed(table, new_side: int):
    """CLIP position table [1 + n*n, C] -> [1 + new_side**2, C]: CLS row kept, the n x n grid
    resized with bicubic interpolation (align_corners False, no antialias), row-major order."""
    import torch
    import torch.nn.functional as F
    table = torch.as_tensor(table, dtype=torch.float32)
    n = int(round(math.sqrt(table.shape[0] - 1)))
    if n * n + 1 != table.shape[0]:
        raise ValueError(f"position table with {table.shape[0]} rows is not 1 + square")
    if n == new_side:
        return table.clone()
    grid = table[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1)
    return torch.cat([table[:1], grid], dim=0).contiguous()


def merge_2x2(feats):
    """[n, P*P, C] patch features -> [n, P/2, P/2, 4C]; merged token (a, b) concatenates the patches
    (2a, 2b), (2a, 2b+1), (2a+1, 2b), (2a+1, 2b+1) in that channel order."""
    n, N, C = feats.shape
    P = int(round(math.sqrt(N)))
    s = P // 2
    x = feats.reshape(n, P, P, C)
    out = feats.new_empty(n, s, s, 4 * C)
    out[..., 0 * C:1 * C] = x[:, 0::2, 0::2]
    out[..., 1 * C:2 * C] = x[:, 0::2, 1::2]
    out[..., 2 * C:3 * C] = x[:, 1::2, 0::2]
    out[..., 3 * C:4 * C] = x[:, 1::2, 1::2]
    return out


def hd_layout(glb, crops, h: int, w: int, glb_gn, sub_gn):
    """Token layout of one HD image (before the projector).

    glb: [s, s, D] merged global view; crops: [h*w, s, s, D] merged local crops (row-major crop order);
    glb_gn: [D]; sub_gn: [D]. Returns [(h*w+1)*s*s + 1 + (h+1)*s, D]."""
    import torch
    s, D = glb.shape[0], glb.shape[-1]
    rows = []
    for a in range(s):
        rows.append(glb[a])
        rows.append(sub_gn.reshape(1, D))
    rows.append(glb_gn.reshape(1, D))
    mosaic = crops.reshape(h, w, s, s, D).permute(0, 2, 1, 3, 4).reshape(h * s, w * s, D)
    for r in range(h * s):
        rows.append(mosaic[r])
        rows.append(sub_gn.reshape(1, D))
    out = torch.cat(rows, dim=0)
    assert out.shape[0] == hd_token_count(h, w, s)
    return out


def hd_token_count(h: int, w: int, crop_tokens_side: int) -> int:
    """Tokens of one HD image with an h x w grid: (h*w + 1)*s^2 + 1 + (h + 1)*s."""
    s = crop_tokens_side
    return (h * w + 1) * s * s + 1 + (h + 1) * s


# --------------------------------------------------------------------------------------------
# image preprocessing (PIL only)
# --------------------------------------------------------------------------------------------

def _to_normalized_array(img) -> np.ndarray:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0          # H, W, 3
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def hd_grid_scale(width: int, height: int, hd_num: int) -> int:
    """Largest integer scale with scale * ceil(scale / (width/height)) <= hd_num (width >= height)."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return scale - 1


def hd_transform_image(pil_image, hd_num: int, crop: int, variant: str = "4khd"):
    """The HD resize + centred white padding on the PIL image (upstream ``HD_transform`` for
    ``variant='4khd'``, ``R560_HD18_Identity_transform`` (training) for ``variant='2.5'``)."""
    from PIL import Image
    img = pil_image.convert("RGB")
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = hd_grid_scale(width, height, hd_num)
    if variant in ("2.5", "hd25"):
        scale = int(min(math.ceil(width * 1.5 / crop), scale))
    elif variant not in ("4khd", "hd"):
        raise ValueError(variant)
    new_w = int(scale * crop)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    tar = int(math.ceil(new_h / crop) * crop)
    top = int((tar - new_h) / 2)
    canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
    canvas.paste(img, (0, top))
    img = canvas
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def hd_transform_reference(pil_image, hd_num: int, crop: int, variant: str = "4khd"):
    """HD-transformed, CLIP-normalised image as float32 [3, H, W] and its grid (h, w) = (H/crop, W/crop)."""
    img = hd_transform_image(pil_image, hd_num, crop, variant)
    arr = _to_normalized_array(img)
    return arr, (arr.shape[1] // crop, arr.shape[2] // crop)


def plain_transform_reference(pil_image, img_size: int) -> np.ndarray:
    """hd_num -1 path (IXC2-7B / VL): bicubic resize to img_size x img_size, ToTensor, Normalize."""
    from PIL import Image
    img = pil_image.convert("RGB").resize((img_size, img_size), Image.Resampling.BICUBIC)
    return _to_normalized_array(img)


# --------------------------------------------------------------------------------------------
# the torch reference model
# --------------------------------------------------------------------------------------------

def _rms_norm(x, w, eps):
    import torch
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    import torch
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class IXC2Reference:
    """Float32 reference of one IXC2-family checkpoint written by ``write_tiny_checkpoint`` (or any
    directory with the same layout plus ``ixc_reference.json``)."""

    def __init__(self, ckpt_dir: str, side: dict | None = None):
        import torch
        from safetensors.torch import load_file
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with open(os.path.join(ckpt_dir, "config.json")) as f:
            self.config = json.load(f)
        if side is None:
            with open(os.path.join(ckpt_dir, "ixc_reference.json")) as f:
                side = json.load(f)
        self.side = side
        self.variant = side["variant"]
        self.hd = self.variant in HD_VARIANTS
        self.w = load_file(os.path.join(ckpt_dir, "model.safetensors"))
        c = self.config
        self.H = c["hidden_size"]
        self.nh = c["num_attention_heads"]
        self.nkv = c["num_key_value_heads"]
        self.d = self.H // self.nh
        self.eps = c["rms_norm_eps"]
        self.theta = float(c["rope_theta"])
        self.mpe = c["max_position_embeddings"]
        self.rope_scaling = c.get("rope_scaling")
        self.scaling = dict(side["plora_scaling"])

        patch = side["patch_size"]
        if self.hd:
            self.vit_size = side["crop"]
        else:
            self.vit_size = side["img_size"]
        side_len = self.vit_size // patch
        pos = self.w[VIT_PREFIX + "embeddings.position_embedding.weight"]
        if pos.shape[0] != side_len ** 2 + 1:            # upstream resize_pos (no-op when already resized)
            pos = resize_pos_embed(pos, side_len)
        vcfg = CLIPVisionConfig(hidden_size=side["vit_hidden"], intermediate_size=side["vit_intermediate"],
                                num_hidden_layers=side["vit_layers"], num_attention_heads=side["vit_heads"],
                                image_size=self.vit_size, patch_size=patch, hidden_act="quick_gelu",
                                layer_norm_eps=1e-5, num_channels=3)
        vcfg._attn_implementation = "eager"
        self.vit = CLIPVisionModel(vcfg).eval().to(torch.float32)
        own = self.vit.state_dict()
        sd = {}
        for name in own:
            bare = name[len("vision_model."):] if name.startswith("vision_model.") else name
            key = VIT_PREFIX + bare
            if bare == "embeddings.position_embedding.weight":
                sd[name] = pos
            elif key in self.w:
                sd[name] = self.w[key]
        missing = [n for n in own if n not in sd]
        bad = [n for n in missing if "post_layernorm" not in n and "position_ids" not in n]
        if bad:
            raise KeyError(f"vision weights missing from checkpoint: {bad}")
        self.vit.load_state_dict(sd, strict=False)

    # ---------------- vision ----------------
    @property
    def crop_tokens_side(self) -> int | None:
        return (self.side["crop"] // self.side["patch_size"]) // 2 if self.hd else None

    def _clip_patch_features(self, pixels):
        import torch
        with torch.no_grad():
            out = self.vit(pixel_values=pixels.to(torch.float32), output_hidden_states=True)
        return out.hidden_states[-1][:, 1:]                    # last encoder layer, CLS dropped

    def _projector(self, x):
        import torch.nn.functional as F
        w = self.w
        x = F.linear(x, w["vision_proj.0.weight"], w["vision_proj.0.bias"])
        x = F.gelu(x)
        return F.linear(x, w["vision_proj.2.weight"], w["vision_proj.2.bias"])

    def image_tokens(self, pixels) -> int:
        """Number of LLM tokens the given pixel tensor becomes."""
        if self.hd:
            Hp, Wp = pixels.shape[-2:]
            crop = self.side["crop"]
            return hd_token_count(Hp // crop, Wp // crop, self.crop_tokens_side)
        return (self.side["img_size"] // self.side["patch_size"]) ** 2

    def encode_image(self, pixels, project: bool = True):
        """One image -> [n_tokens, H] (``project=False``: the pre-projector features).

        Non-HD: pixels [3, S, S] or [1, 3, S, S] with S = img_size.
        HD: pixels [3, h*crop, w*crop] or [1, 3, h*crop, w*crop] (the padded, normalised image)."""
        import torch
        import torch.nn.functional as F
        x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
        if x.ndim == 3:
            x = x[None]
        if not self.hd:
            S = self.side["img_size"]
            if tuple(x.shape[-2:]) != (S, S):
                raise ValueError(f"expected {S}x{S} pixels, got {tuple(x.shape[-2:])}")
            feats = self._clip_patch_features(x)[0]
        else:
            crop = self.side["crop"]
            Hp, Wp = x.shape[-2:]
            if Hp % crop or Wp % crop:
                raise ValueError(f"HD image {Hp}x{Wp} is not a multiple of the crop {crop}")
            h, w = Hp // crop, Wp // crop
            crops = x.reshape(3, h, crop, w, crop).permute(1, 3, 0, 2, 4).reshape(h * w, 3, crop, crop)
            glb = F.interpolate(x, size=(crop, crop), mode="bicubic", align_corners=False)
            feats = self._clip_patch_features(torch.cat([glb, crops], dim=0))
            merged = merge_2x2(feats)
            feats = hd_layout(merged[0], merged[1:], h, w, self.w["plora_glb_GN"].reshape(-1),
                              self.w["plora_sub_GN"].reshape(-1))
        return self._projector(feats) if project else feats

    # ---------------- decoder ----------------
    def _inv_freq(self, seq_len: int):
        import torch
        base = self.theta
        rs = self.rope_scaling
        if rs and rs.get("type") == "dynamic" and seq_len > self.mpe:
            f = float(rs["factor"])
            base = base * ((f * seq_len / self.mpe) - (f - 1)) ** (self.d / (self.d - 2))
        return 1.0 / (base ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))

    def _plora(self, x, prefix: str, mod: str, im_mask):
        import torch.nn.functional as F
        w = self.w
        y = F.linear(x, w[prefix + mod + ".weight"], w.get(prefix + mod + ".bias"))
        if im_mask is not None and bool(im_mask.any()):
            xa = x[im_mask]
            delta = F.linear(F.linear(xa, w[prefix + mod + ".Plora_A.weight"]), w[prefix + mod + ".Plora_B.weight"])
            y = y.clone()
            y[im_mask] = y[im_mask] + delta * self.scaling[mod]
        return y

    def forward_embeds(self, embeds, im_mask=None, use_plora: bool = True):
        """embeds [T, H] float32, im_mask [T] bool -> logits [T, V] float32 (causal, positions 0..T-1)."""
        import torch
        import torch.nn.functional as F
        x = torch.as_tensor(embeds, dtype=torch.float32)
        T = x.shape[0]
        m = None
        if im_mask is not None and use_plora:
            m = torch.as_tensor(np.asarray(im_mask), dtype=torch.bool)
            assert m.shape == (T,)
        inv = self._inv_freq(T)
        pos = torch.arange(T, dtype=torch.float32)
        if self.rope_scaling and self.rope_scaling.get("type") == "linear":
            pos = pos / float(self.rope_scaling["factor"])
        freqs = torch.outer(pos, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()                                   # [T, d]
        causal = torch.full((T, T), float("-inf")).triu(1)
        g = self.nh // self.nkv
        w = self.w
        with torch.no_grad():
            for i in range(self.config["num_hidden_layers"]):
                p = f"model.layers.{i}."
                h = _rms_norm(x, w[p + "attention_norm.weight"], self.eps)
                qkv = self._plora(h, p, "attention.wqkv", m).reshape(T, self.nkv, g + 2, self.d)
                q = qkv[:, :, :g].reshape(T, self.nh, self.d)              # head = kv*g + slot
                k = qkv[:, :, g]
                v = qkv[:, :, g + 1]
                q = q.transpose(0, 1)
                k = k.transpose(0, 1)
                v = v.transpose(0, 1)                                     # [heads, T, d]
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
                k = k.repeat_interleave(g, dim=0)
                v = v.repeat_interleave(g, dim=0)
                att = (q @ k.transpose(1, 2)) / math.sqrt(self.d) + causal
                att = torch.softmax(att, dim=-1)
                o = (att @ v).transpose(0, 1).reshape(T, self.nh * self.d)
                x = x + self._plora(o, p, "attention.wo", m)
                h = _rms_norm(x, w[p + "ffn_norm.weight"], self.eps)
                a = F.silu(self._plora(h, p, "feed_forward.w1", m)) * self._plora(h, p, "feed_forward.w3", m)
                x = x + self._plora(a, p, "feed_forward.w2", m)
            x = _rms_norm(x, w["model.norm.weight"], self.eps)
            return F.linear(x, w["output.weight"]).to(torch.float32)

    # ---------------- interleaving ----------------
    def embed_segments(self, segments: Sequence):
        """segments: a list whose items are token-id lists (text) or pixel arrays (one image each),
        concatenated in order as upstream ``interleav_wrap`` does. Returns (embeds [T, H], im_mask [T])."""
        import torch
        embs, mask = [], []
        for seg in segments:
            if isinstance(seg, (list, tuple)) or (isinstance(seg, np.ndarray) and seg.ndim == 1):
                ids = torch.as_tensor(np.asarray(seg, dtype=np.int64))
                embs.append(self.w["model.tok_embeddings.weight"][ids])
                mask.append(torch.zeros(len(ids), dtype=torch.bool))
            else:
                with torch.no_grad():
                    e = self.encode_image(seg)
                embs.append(e)
                mask.append(torch.ones(e.shape[0], dtype=torch.bool))
        return torch.cat(embs, 0), torch.cat(mask, 0)

    def logits_from_ids(self, input_ids: Sequence[int], images: Sequence = (), image_token_id: int | None = None,
                        use_plora: bool = True):
        """input_ids with one run of ``image_token_id`` per image (run length = that image's token count):
        each run is replaced by the image's embeddings and marked in im_mask. Returns (logits, im_mask)."""
        import torch
        ids = np.asarray(input_ids, dtype=np.int64)
        emb = self.w["model.tok_embeddings.weight"][torch.as_tensor(np.where(ids < 0, 0, ids))].clone()
        mask = np.zeros(len(ids), dtype=bool)
        if images:
            if image_token_id is None:
                raise ValueError("image_token_id is required with images")
            is_img = ids == image_token_id
            starts = [i for i in range(len(ids)) if is_img[i] and (i == 0 or not is_img[i - 1])]
            if len(starts) != len(images):
                raise ValueError(f"{len(starts)} image runs in input_ids for {len(images)} images")
            for st, px in zip(starts, images):
                with torch.no_grad():
                    e = self.encode_image(px)
                n = e.shape[0]
                if not is_img[st:st + n].all() or (st + n < len(ids) and is_img[st + n]):
                    raise ValueError(f"image run at {st} does not have exactly {n} tokens")
                emb[st:st + n] = e
                mask[st:st + n] = True
        return self.forward_embeds(emb, mask if use_plora else None), mask


def load_reference(ckpt_dir: str) -> IXC2Reference:
    return IXC2Reference(ckpt_dir)


def reference_logits(ckpt, input_ids: Sequence[int], images: Sequence = (), image_token_id: int | None = None,
                     use_plora: bool = True) -> np.ndarray:
    """Float32 logits [T, V] (numpy) of one sample; ``ckpt`` is a directory or an ``IXC2Reference``."""
    model = ckpt if isinstance(ckpt, IXC2Reference) else IXC2Reference(ckpt)
    logits, _ = model.logits_from_ids(input_ids, images, image_token_id, use_plora=use_plora)
    return logits.numpy()


# --------------------------------------------------------------------------------------------
# training-time text
# --------------------------------------------------------------------------------------------

def conv2text_reference(conversations: Iterable[dict]) -> str:
    """Upstream ``conv2text``: user/human (any case) -> user turn, anything else -> assistant turn."""
    out = ""
    for turn in conversations:
        role = "user" if turn["from"].lower() in ("human", "user") else "assistant"
        out += f"[UNUSED_TOKEN_146]{role}\n{turn['value'].strip()}[UNUSED_TOKEN_145]\n"
    return out + "</s>"


def wrap_training_sample(text: str, tokenize, image_token_counts: Sequence[int], bos_id: int = BOS_ID,
                         max_length: int | None = None, image_placeholder_id: int = -100):
    """Upstream ``interleav_wrap`` for one training sample, on ids instead of embeddings.

    ``tokenize(str) -> list[int]`` must not add special tokens. Returns (ids, im_mask) where image
    positions hold ``image_placeholder_id`` (upstream uses -100 there, which the label rule relies on).
    With exactly one image and no ``<ImageHere>`` the image is prepended; BOS goes on the first
    non-empty text part (so after a leading image). Stops after the part that crosses ``max_length``
    and truncates to it."""
    n_img = len(image_token_counts)
    if n_img == 1 and "<ImageHere>" not in text:
        text = "<ImageHere>" + text
    parts = text.split("<ImageHere>")
    ids: list[int] = []
    mask: list[bool] = []
    need_bos = True
    for idx, part in enumerate(parts):
        if len(part) > 0:
            toks = ([bos_id] if need_bos else []) + list(tokenize(part))
            need_bos = False
            ids += toks
            mask += [False] * len(toks)
        if idx < n_img:
            ids += [image_placeholder_id] * image_token_counts[idx]
            mask += [True] * image_token_counts[idx]
        if max_length is not None and len(ids) > max_length:
            break
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def mask_human_targets_reference(ids: Sequence[int], im_end_id: int = IM_END_ID, eos_id: int = EOS_ID) -> list[int]:
    """Upstream ``mask_human_targets`` on one id sequence (image positions already -100)."""
    ids = list(ids)
    tgt = list(ids)
    end_count, last_eoa = 0, 0
    tid = None
    for i, tid in enumerate(ids):
        if tid == im_end_id:
            if end_count % 2 == 0:
                for j in range(last_eoa, min(i + 6, len(tgt))):
                    tgt[j] = -100
            else:
                last_eoa = i + 1
            end_count += 1
        elif tid == eos_id:
            for j in range(i + 1, len(tgt)):
                tgt[j] = -100
            break
    if tid != eos_id and end_count % 2 == 0:
        for j in range(last_eoa + 1, len(tgt)):
            tgt[j] = -100
    return tgt


def shifted_ce_loss(logits, labels) -> float:
    """Token-mean cross entropy of logits[:-1] against labels[1:] ignoring -100 (upstream loss)."""
    import torch
    import torch.nn.functional as F
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    lb = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return float(F.cross_entropy(lg[:-1], lb[1:], ignore_index=-100))


def torch_language_model(ref: "IXC2Reference"):
    """The reference's decoder as a ``torch.nn.Module`` with upstream's module names
    (``model.layers.{i}.attention.wqkv`` ... ``output``), the projections ``nn.Linear`` subclasses
    carrying ``Plora_A`` / ``Plora_B`` (applied where the shared ``im_mask`` is true), so that
    ``peft.PeftModel`` attaches an XComposer2 LoRA adapter to it exactly as upstream's PEFT does.
    ``forward(embeds [T, H], im_mask [T]) -> logits [T, V]``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    mask_box = [None]

    class PLoRALinear(nn.Linear):
        def __init__(self, fin, fout, r, scaling):
            super().__init__(fin, fout, bias=False)
            self.Plora_A = nn.Linear(fin, r, bias=False)
            self.Plora_B = nn.Linear(r, fout, bias=False)
            self.scaling = scaling

        def forward(self, x):
            y = super().forward(x)
            m = mask_box[0]
            if m is not None and bool(m.any()):
                y = y.clone()
                y[m] = y[m] + self.Plora_B(self.Plora_A(x[m])) * self.scaling
            return y

    c, w = ref.config, ref.w
    H, L = ref.H, c["num_hidden_layers"]

    def plora(prefix, mod):
        wt = w[prefix + mod + ".weight"]
        r = w[prefix + mod + ".Plora_A.weight"].shape[0]
        lin = PLoRALinear(wt.shape[1], wt.shape[0], r, ref.scaling[mod])
        lin.weight.data.copy_(wt)
        lin.Plora_A.weight.data.copy_(w[prefix + mod + ".Plora_A.weight"])
        lin.Plora_B.weight.data.copy_(w[prefix + mod + ".Plora_B.weight"])
        return lin

    class Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"model.layers.{i}."
            self.attention = nn.Module()
            self.attention.wqkv, self.attention.wo = plora(p, "attention.wqkv"), plora(p, "attention.wo")
            self.feed_forward = nn.Module()
            for n in ("w1", "w2", "w3"):
                setattr(self.feed_forward, n, plora(p, "feed_forward." + n))
            self.attention_norm = nn.Parameter(w[p + "attention_norm.weight"].clone())
            self.ffn_norm = nn.Parameter(w[p + "ffn_norm.weight"].clone())

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Layer(i) for i in range(L)])
            self.model.norm = nn.Parameter(w["model.norm.weight"].clone())
            self.output = nn.Linear(H, w["output.weight"].shape[0], bias=False)
            self.output.weight.data.copy_(w["output.weight"])

        def prepare_inputs_for_generation(self, *args, **kwargs):   # what peft's causal-LM wrapper looks up
            raise NotImplementedError

        def forward(self, embeds, im_mask=None):
            x = torch.as_tensor(embeds, dtype=torch.float32)
            mask_box[0] = None if im_mask is None else torch.as_tensor(np.asarray(im_mask), dtype=torch.bool)
            T, g = x.shape[0], ref.nh // ref.nkv
            inv = ref._inv_freq(T)
            freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos(), emb.sin()
            causal = torch.full((T, T), float("-inf")).triu(1)
            for layer in self.model.layers:
                h = _rms_norm(x, layer.attention_norm, ref.eps)
                qkv = layer.attention.wqkv(h).reshape(T, ref.nkv, g + 2, ref.d)
                q = qkv[:, :, :g].reshape(T, ref.nh, ref.d).transpose(0, 1)
                k, v = qkv[:, :, g].transpose(0, 1), qkv[:, :, g + 1].transpose(0, 1)
                q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
                k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)
                att = torch.softmax((q @ k.transpose(1, 2)) / math.sqrt(ref.d) + causal, dim=-1)
                x = x + layer.attention.wo((att @ v).transpose(0, 1).reshape(T, ref.nh * ref.d))
                h = _rms_norm(x, layer.ffn_norm, ref.eps)
                ff = layer.feed_forward
                x = x + ff.w2(F.silu(ff.w1(h)) * ff.w3(h))
            return self.output(_rms_norm(x, self.model.norm, ref.eps))

    return LM().eval()


def build_ixc2_tokenizer(out_dir: str, corpus: Sequence[str], vocab_size: int = 400):
    """A small byte-level BPE tokenizer with InternLM2's special tokens (``<s>`` BOS added by
    ``add_special_tokens``, ``</s>`` EOS = pad, ``[UNUSED_TOKEN_146]`` / ``[UNUSED_TOKEN_145]``), in
    which the assistant header ``\n[UNUSED_TOKEN_146]assistant\n`` is 5 tokens as in InternLM2's own
    (``ass`` + ``istant``), so upstream's fixed 5-token header mask applies unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    special = ["<s>", "</s>", "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.add_tokens(["ass", "istant"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   additional_special_tokens=special[2:])
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# self-check
# --------------------------------------------------------------------------------------------

def _llama_cross_check(ref: IXC2Reference, ids) -> None:
    """Text-only logits of the hand-written decoder == transformers' Llama with the unpacked wqkv."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    c = ref.config
    g, d, nkv = ref.nh // ref.nkv, ref.d, ref.nkv
    lc = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=ref.H, intermediate_size=c["intermediate_size"],
                     num_hidden_layers=c["num_hidden_layers"], num_attention_heads=ref.nh,
                     num_key_value_heads=nkv, rms_norm_eps=ref.eps, rope_theta=ref.theta,
                     max_position_embeddings=ref.mpe, tie_word_embeddings=False, attention_bias=False)
    lc._attn_implementation = "eager"
    llama = LlamaForCausalLM(lc).eval()
    sd = {"model.embed_tokens.weight": ref.w["model.tok_embeddings.weight"], "model.norm.weight": ref.w["model.norm.weight"],
          "lm_head.weight": ref.w["output.weight"]}
    for i in range(c["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        rows = ref.w[p + "attention.wqkv.weight"].reshape(nkv, g + 2, d, ref.H)
        sd[q + "self_attn.q_proj.weight"] = rows[:, :g].reshape(-1, ref.H)
        sd[q + "self_attn.k_proj.weight"] = rows[:, g].reshape(-1, ref.H)
        sd[q + "self_attn.v_proj.weight"] = rows[:, g + 1].reshape(-1, ref.H)
        sd[q + "self_attn.o_proj.weight"] = ref.w[p + "attention.wo.weight"]
        sd[q + "mlp.gate_proj.weight"] = ref.w[p + "feed_forward.w1.weight"]
        sd[q + "mlp.up_proj.weight"] = ref.w[p + "feed_forward.w3.weight"]
        sd[q + "mlp.down_proj.weight"] = ref.w[p + "feed_forward.w2.weight"]
        sd[q + "input_layernorm.weight"] = ref.w[p + "attention_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = ref.w[p + "ffn_norm.weight"]
    llama.load_state_dict(sd, strict=True)
    text = torch.as_tensor([max(t, 0) for t in ids])
    with torch.no_grad():
        want = llama(input_ids=text[None]).logits[0]
    got = ref.forward_embeds(ref.w["model.tok_embeddings.weight"][text], None)
    assert float((want - got).abs().max()) < 1e-4, float((want - got).abs().max())


def _layout_cross_check() -> None:
    """merge_2x2 + hd_layout == the reshape/permute formulation of the same layout."""
    import torch
    P, C, h, w = 4, 3, 2, 3
    s, D = P // 2, 4 * C
    feats = torch.arange((1 + h * w) * P * P * C, dtype=torch.float32).reshape(1 + h * w, P * P, C)
    glb_gn, sub_gn = -torch.ones(D), -2 * torch.ones(D)
    m = feats.reshape(-1, s, 2, s, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, D)
    g_part = torch.cat([m[0], sub_gn.expand(s, 1, D)], dim=1).reshape(-1, D)
    loc = m[1:].reshape(h, w, s, s, D).permute(0, 2, 1, 3, 4).reshape(h * s, w * s, D)
    l_part = torch.cat([loc, sub_gn.expand(h * s, 1, D)], dim=1).reshape(-1, D)
    want = torch.cat([g_part, glb_gn[None], l_part], dim=0)
    merged = merge_2x2(feats)
    got = hd_layout(merged[0], merged[1:], h, w, glb_gn, sub_gn)
    assert torch.equal(want, got)


def _self_check() -> None:
    import tempfile
    import time
    from PIL import Image

    t0 = time.time()
    rng = np.random.default_rng(0)
    IMG = 999                                       # placeholder id inside the tiny 1000-token vocab
    tok = lambda s: [3 + (ord(ch) % 900) for ch in s]                       # noqa: E731
    pil = Image.fromarray(rng.integers(0, 256, size=(40, 100, 3), dtype=np.uint8))   # landscape 100x40
    tall = Image.fromarray(rng.integers(0, 256, size=(90, 30, 3), dtype=np.uint8))   # portrait 30x90
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            d = write_tiny_checkpoint(os.path.join(tmp, variant), variant, seed=1)
            ref = load_reference(d)
            if ref.hd:
                crop = ref.side["crop"]
                px, (h, w) = hd_transform_reference(pil, hd_num=6, crop=crop,
                                                    variant="2.5" if variant == "hd25" else "4khd")
                assert px.shape == (3, h * crop, w * crop), px.shape
                pt, (ht, wt) = hd_transform_reference(tall, hd_num=6, crop=crop)
                assert ht >= wt and pt.shape == (3, ht * crop, wt * crop)
            else:
                px = plain_transform_reference(pil, ref.side["img_size"])
            n = ref.image_tokens(px)
            text = conv2text_reference([{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "ok."}])
            text = text.replace("[UNUSED_TOKEN_146]", "\x01").replace("[UNUSED_TOKEN_145]", "\x02")
            ids, mask = wrap_training_sample(text, tok, [n], image_placeholder_id=IMG)
            assert ids[n] == BOS_ID and all(mask[:n]) and not any(mask[n:])
            logits, im_mask = ref.logits_from_ids(ids, [px], image_token_id=IMG)
            assert logits.shape == (len(ids), ref.config["vocab_size"]) and bool(logits.isfinite().all())
            assert int(im_mask.sum()) == n
            no_plora, _ = ref.logits_from_ids(ids, [px], image_token_id=IMG, use_plora=False)
            assert float((logits - no_plora).abs().max()) > 1e-4, "PLoRA must change image positions"
            emb, m2 = ref.embed_segments([[BOS_ID] + tok("x"), px, tok("y")])
            assert emb.shape[0] == 2 + n + 1 and int(m2.sum()) == n
            print(f"{variant:6s} image tokens {n:4d}  sequence {len(ids):4d}  logits {tuple(logits.shape)}")
            if variant == "vl490":          # native table stored + resized at load == pre-resized table
                d2 = write_tiny_checkpoint(os.path.join(tmp, "vl490n"), variant, seed=1, store_resized_pos=False)
                other, _ = load_reference(d2).logits_from_ids(ids, [px], image_token_id=IMG)
                assert float((other - logits).abs().max()) < 1e-5
            if variant == "plain":
                _llama_cross_check(ref, ids)
        _layout_cross_check()
        labels = mask_human_targets_reference([-100, -100, 1, 5, IM_END_ID, 7, 8, 9, 10, 11, 12, 13,
                                               IM_END_ID, 14, 2, 0])
        assert labels == [-100] * 10 + [12, 13, IM_END_ID, 14, 2, -100], labels
    print(f"ok in {time.time() - t0:.2f} s")


if __name__ == "__main__":
    _self_check()
