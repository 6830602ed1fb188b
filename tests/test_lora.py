"""LoRA: identity at B = 0, merge == unmerged, peft round trip (save -> PeftModel, load_peft_adapter),
misfit adapters rejected, dropout, and upstream trainable-parameter counts on the real shapes."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax.models import lora as L
from mmjax.models.decoder import CausalLM
from mmjax.models.families import config_from_hf
from mmjax.models.layers import logical_axes
from mmjax.weights import peft_io, rules
from tests import hf_fixtures as F

B, T = 2, 16
TOL = 1e-3  # max|diff| / std(reference)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.std(b))


@functools.lru_cache(maxsize=None)
def _fixture(name):
    _, hf_cfg, tensors = F.build(name)
    return hf_cfg, tensors


def load(name):
    """A fresh CausalLM filled from the fixture (abstract init, every param assigned)."""
    hf_cfg, tensors = _fixture(name)
    cfg = config_from_hf(hf_cfg)
    lm = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    rules.assign(lm, lm.weight_rules(), tensors, lm.num_layers_map())
    return lm


def ids(seed=0, t=T):
    return np.random.default_rng(seed).integers(3, F.VOCAB, (B, t)).astype(np.int32)


@jax.jit
def _fwd_impl(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def fwd(model, x):
    graphdef, state = nnx.split(model)
    return np.asarray(_fwd_impl(graphdef, state, x))


def base_state(model):
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def randomize_b(model, seed=1, scale=0.05):
    for j, (_, d) in enumerate(L.lora_modules(model)):
        d.lora_b.set_value(scale * jax.random.normal(jax.random.key(seed + j), d.lora_b.shape, d.lora_b.dtype))


# --------------------------------------------------------------------------------------------


def test_zero_b_is_identity_and_params_are_lora_params():
    lm = load("qwen3")
    x = ids()
    ref = fwd(lm, x)
    L.apply_lora(lm, llm_rank=4, rngs=3)
    mods = dict(L.lora_modules(lm))
    assert set(mods) == {("layers", "attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | \
        {("layers", "mlp", n) for n in ("gate_proj", "up_proj", "down_proj")}
    q = mods[("layers", "attn", "q_proj")]
    assert isinstance(q.lora_a, nnx.LoRAParam) and isinstance(q.lora_b, nnx.LoRAParam)
    assert q.lora_a.shape == (F.LAYERS, F.HIDDEN, 4) and q.lora_b.shape == (F.LAYERS, 4, lm.cfg.q_dim)
    assert logical_axes(q.lora_a) == ("layers", "embed", "lora_rank")
    assert logical_axes(q.lora_b) == ("layers", "lora_rank", "heads")
    assert q.lora_scaling == 2.0 and q.lora_alpha == 8.0
    a = np.asarray(q.lora_a[...])
    bound = 1 / np.sqrt(F.HIDDEN)
    assert np.all(np.abs(a) <= bound) and np.std(a) > 0.4 * bound     # kaiming-uniform(a=sqrt 5)
    assert not np.any(np.asarray(q.lora_b[...]))
    np.testing.assert_array_equal(fwd(lm, x), ref)
    randomize_b(lm)
    assert _rel(fwd(lm, x), ref) > 1e-2                                  # the branch is live


@pytest.mark.parametrize("name", ["qwen3", "phi3", "internlm2"])
def test_merge_equals_unmerged(name):
    lm = load(name)
    L.apply_lora(lm, llm_rank=4, rngs=0)
    randomize_b(lm)
    x = ids(1)
    unmerged = fwd(lm, x)
    n = L.lora_param_count(lm)
    assert n > 0
    kernels_before = {p: np.asarray(d.kernel[...]) for p, d in L.lora_modules(lm)}
    L.merge_lora(lm)
    assert L.lora_modules(lm) == [] and L.lora_param_count(lm) == 0
    assert not jax.tree.leaves(nnx.state(lm, nnx.LoRAParam))
    for p, k in kernels_before.items():
        assert not np.array_equal(np.asarray(L._get_module(lm, p).kernel[...]), k)
    merged = fwd(lm, x)
    rel = np.max(np.abs(merged - unmerged)) / np.max(np.abs(unmerged))
    assert rel <= 1e-5, rel


def test_target_spellings_and_unknown_target():
    lm = load("internlm2")
    for spelling in ("wqkv", "attention.wqkv", "qkv_proj", "attn.qkv_proj", "layers.attn.qkv_proj"):
        got = L.resolve_targets(lm, [spelling], "llm")
        assert [m.path for m in got] == [("layers", "attn", "qkv_proj")], spelling
    with pytest.raises(NotImplementedError, match="subset of stacked layers"):
        L.resolve_targets(lm, ["model.layers.0.attention.wqkv"], "llm")
    default = {m.local_hf_name for m in L.resolve_targets(lm, L.default_llm_targets(lm), "llm")}
    assert default == {f"model.layers.{{i}}.{n}" for n in ("attention.wqkv", "attention.wo", "feed_forward.w1",
                                                             "feed_forward.w2", "feed_forward.w3")}
    with pytest.raises(ValueError, match=r"'q_proj'.*available: .*attention\.wqkv"):
        L.apply_lora(lm, llm_rank=4, llm_targets=["q_proj"])
    assert L.lora_modules(lm) == []                                      # nothing added on error
    qwen = load("qwen3")
    got = L.resolve_targets(qwen, ["self_attn.q_proj", "mlp.down_proj"], "llm")
    assert [m.local_path for m in got] == [("layers", "attn", "q_proj"), ("layers", "mlp", "down_proj")]
    with pytest.raises(ValueError, match="already carries LoRA"):
        L.apply_lora(L.apply_lora(qwen, llm_rank=2), llm_rank=2)


def test_dropout_needs_key_and_is_keyed():
    lm = load("qwen3")
    x = ids(2)
    L.apply_lora(lm, llm_rank=4, dropout=0.5, rngs=0)
    randomize_b(lm, scale=0.2)
    off = fwd(lm, x)
    L.set_lora_dropout_key(lm, jax.random.key(7))
    on1, on1b = fwd(lm, x), fwd(lm, x)
    L.set_lora_dropout_key(lm, jax.random.key(8))
    on2 = fwd(lm, x)
    L.set_lora_dropout_key(lm, None)
    np.testing.assert_array_equal(fwd(lm, x), off)
    np.testing.assert_array_equal(on1, on1b)
    assert _rel(on1, off) > 1e-3 and _rel(on2, on1) > 1e-3
    # the dropout state is not a parameter: the LoRA split holds only the factors
    assert all(k[-1] in ("lora_a", "lora_b") for k, _ in nnx.to_flat_state(nnx.state(lm, nnx.LoRAParam)))


# ---- peft round trip ---------------------------------------------------------------------------------


def train_lora(lm, steps=4, lr=2e-2):
    """A few adam steps on the LoRA params only (next-token CE on random ids)."""
    graphdef, lora_state, rest = nnx.split(lm, nnx.LoRAParam, ...)
    opt = optax.adam(lr)
    opt_state = opt.init(lora_state)

    @jax.jit
    def step(lora_state, opt_state, x):
        def loss_fn(ls):
            logits = nnx.merge(graphdef, ls, rest)(x[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
        loss, g = jax.value_and_grad(loss_fn)(lora_state)
        upd, opt_state = opt.update(g, opt_state, lora_state)
        return optax.apply_updates(lora_state, upd), opt_state, loss

    losses = []
    for s in range(steps):
        lora_state, opt_state, loss = step(lora_state, opt_state, ids(10 + s, T + 1))
        losses.append(float(loss))
    nnx.update(lm, lora_state)
    return losses


@functools.lru_cache(maxsize=None)
def trained_adapter(name, tmp_root):
    """(adapter dir, mmjax logits of the trained adapter) for a fixture; the adapter is trained here."""
    lm = load(name)
    L.apply_lora(lm, llm_rank=4, rngs=5)
    base_before = jax.tree.map(np.asarray, base_state(lm))
    lora_before = jax.tree.map(np.asarray, nnx.state(lm, nnx.LoRAParam))
    losses = train_lora(lm)
    assert np.all(np.isfinite(losses))
    # only LoRA params moved; the base is bit-identical
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base_state(lm)), base_before)
    after = nnx.to_flat_state(jax.tree.map(np.asarray, nnx.state(lm, nnx.LoRAParam)))
    before = dict(nnx.to_flat_state(lora_before))
    for k, v in after:
        assert not np.array_equal(v[...], before[k][...]), k
    out = os.path.join(tmp_root, name)
    peft_io.save_peft_adapter(lm, out, base_model_name_or_path=f"tiny-{name}")
    x = ids(3)
    logits = fwd(lm, x)
    L.merge_lora(lm)
    merged_kernels = {r.hf_key: np.asarray(rules.get_path(nnx.state(lm), r.path)[...])
                      for r in lm.weight_rules()}
    return out, x, logits, merged_kernels, lm


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("adapters"))


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_peft_round_trip(name, tmp_root):
    import peft
    out, x, logits, merged_kernels, merged_lm = trained_adapter(name, tmp_root)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False
    assert cfg["base_model_name_or_path"] == f"tiny-{name}"
    want = {"qwen3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
            "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}[name]
    assert {t.split(".")[-1] for t in cfg["target_modules"]} == want

    torch_model, _, _ = F.build(name)
    pm = peft.PeftModel.from_pretrained(torch_model, out)
    from safetensors.numpy import load_file
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    sd = pm.state_dict()
    assert len([k for k in sd if ".lora_A." in k]) == F.LAYERS * len(want) == len(saved) // 2
    assert sum(v.numel() for k, v in sd.items() if "lora_" in k) == sum(v.size for v in saved.values())
    ref = F.hf_logits(pm, x)
    assert _rel(logits, ref) <= TOL
    # peft's merge == mmjax's merge (the kernels, and so the logits)
    merged = pm.merge_and_unload()
    msd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    for r in merged_lm.weight_rules():
        if r.transform == "linear" and r.path[-1] == "kernel":
            got = rules.to_hf(r, merged_kernels[r.hf_key][0])
            np.testing.assert_allclose(got, msd[r.hf_key.format(i=0)], rtol=0, atol=2e-6)
    assert _rel(fwd(merged_lm, x), F.hf_logits(merged, x)) <= TOL


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_load_peft_adapter_reproduces(name, tmp_root):
    out, x, logits, _, _ = trained_adapter(name, tmp_root)
    lm = load(name)
    base = fwd(lm, x)
    peft_io.load_peft_adapter(lm, out)
    assert L.lora_param_count(lm) > 0
    got = fwd(lm, x)
    np.testing.assert_allclose(got, logits, rtol=0, atol=1e-5)
    assert _rel(got, base) > 1e-3
    # re-export is the same adapter
    again = peft_io.adapter_tensors(lm)
    from safetensors.numpy import load_file
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert set(again) == set(saved)
    for k in saved:
        np.testing.assert_array_equal(again[k], saved[k])


def _copy_adapter(src, dst, edit):
    from safetensors.numpy import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    cfg, tensors = edit(cfg, dict(tensors))
    json.dump(cfg, open(os.path.join(dst, "adapter_config.json"), "w"))
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def test_misfit_adapters_raise(tmp_root, tmp_path):
    qwen_dir = trained_adapter("qwen3", tmp_root)[0]
    phi_dir = trained_adapter("phi3", tmp_root)[0]
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def check(adapter, pattern, name="qwen3"):
        lm = load(name)
        with pytest.raises(ValueError, match=pattern) as e:
            peft_io.load_peft_adapter(lm, adapter)
        assert "\n" not in str(e.value)
        assert L.lora_modules(lm) == []                                  # never a partial load

    def wrong_shape(cfg, t):
        t[key] = np.zeros((t[key].shape[0] + 1, t[key].shape[1]), np.float32)
        return cfg, t

    def missing(cfg, t):
        del t[key]
        return cfg, t

    def extra(cfg, t):
        t["base_model.model.model.layers.0.self_attn.q_norm.lora_A.weight"] = np.zeros((4, 32), np.float32)
        return cfg, t

    def other_rank(cfg, t):
        return dict(cfg, r=8, lora_alpha=16), t

    check(_copy_adapter(qwen_dir, str(tmp_path / "shape"), wrong_shape), rf"{key}: shape")
    check(_copy_adapter(qwen_dir, str(tmp_path / "missing"), missing), rf"{key} is missing")
    check(_copy_adapter(qwen_dir, str(tmp_path / "extra"), extra), r"q_norm\.lora_A\.weight matches no LoRA module")
    check(_copy_adapter(qwen_dir, str(tmp_path / "rank"), other_rank), r"lora_A\.weight: shape \(4, \d+\) != expected \(8")
    # another family: the Phi-3 adapter on Qwen3 (its fused tensors match nothing), and the other way round
    check(phi_dir, r"adapter tensor base_model\.model\.model\.layers\.\d\.(self_attn\.qkv_proj|mlp\.gate_up_proj)"
          r"\.lora_[AB]\.weight matches no LoRA module")
    check(qwen_dir, r"adapter tensor base_model\.model\.model\.layers\.\d\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)"
          r"\.lora_[AB]\.weight matches no LoRA module", "phi3")
    # an adapter whose targets this model lacks entirely
    check(_copy_adapter(qwen_dir, str(tmp_path / "none"), lambda c, t: (dict(c, target_modules=["wqkv"]), t)),
          r"select no linear module")


# ---- InternVL layouts ------------------------------------------------------------------------------


def test_internvl_hf_layout_peft_round_trip(tmp_path):
    """transformers InternVL: LLM r=4 and ViT r=2 (rank_pattern), peft keys model.language_model.* /
    model.vision_tower.*, logits with an image equal peft's."""
    import peft
    import torch
    from mmjax.models import internvl
    from tests import hf_fixtures_internvl as fx
    directory, torch_model = fx.make_hf_internvl(str(tmp_path / "ckpt"))
    config = json.load(open(os.path.join(directory, "config.json")))
    cfg = internvl.InternVLConfig.from_dict(config)
    model = nnx.eval_shape(lambda: internvl.InternVL(cfg, rngs=nnx.Rngs(0)))
    tensors = {internvl.canonical_hf_key(k): v for k, v in fx.load_safetensors_dir(directory).items()}
    rules.assign(model, model.weight_rules(), tensors, model.num_layers_map())
    L.apply_lora(model, llm_rank=4, vit_rank=2, rngs=0)
    paths = {p for p, _ in L.lora_modules(model)}
    assert ("vision_model", "layers", "attn", "q_proj") in paths and ("vision_model", "layers", "mlp", "fc2") in paths
    randomize_b(model)
    out = peft_io.save_peft_adapter(model, str(tmp_path / "adapter"))
    acfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert acfg["r"] == 4 and set(acfg["rank_pattern"].values()) == {2} and acfg["alpha_pattern"]
    from safetensors.numpy import load_file
    keys = set(load_file(os.path.join(out, "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_tower.encoder.layer.1.attention.projection_layer.lora_B.weight" in keys
    rs = np.random.RandomState(0)
    x = rs.randint(0, fx.IMAGE_TOKEN_ID, size=(1, 12)).astype(np.int32)
    x[0, 2:2 + fx.TOKENS_PER_TILE] = fx.IMAGE_TOKEN_ID
    px = rs.randn(1, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3).astype(np.float32)
    ours = np.asarray(model(jnp.asarray(x), pixel_values=jnp.asarray(px)))
    pm = peft.PeftModel.from_pretrained(torch_model, out)
    with torch.no_grad():
        ref = pm(input_ids=torch.from_numpy(x.astype(np.int64)),
                 pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())).logits.numpy()
    assert _rel(ours, ref) <= TOL
    # and back: a fresh mmjax InternVL loads the adapter with both ranks
    fresh = nnx.eval_shape(lambda: internvl.InternVL(cfg, rngs=nnx.Rngs(0)))
    rules.assign(fresh, fresh.weight_rules(), tensors, fresh.num_layers_map())
    peft_io.load_peft_adapter(fresh, out)
    ranks = {p[0]: d.lora_rank for p, d in L.lora_modules(fresh)}
    assert ranks == {"language_model": 4, "vision_model": 2}
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(x), pixel_values=jnp.asarray(px))), ours, atol=1e-5)


def test_internvl_chat_layout_keys():
    from mmjax.models import internvit, internvl
    text = config_from_hf(_fixture("internlm2")[0])
    vision = internvit.config_from_upstream(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, image_size=28, patch_size=14,
                                                 qkv_bias=True, norm_type="layer_norm", qk_normalization=False))
    cfg = internvl.InternVLConfig(vision=vision, text=text, layout="internvl_chat")
    model = nnx.eval_shape(lambda: internvl.InternVL(cfg, rngs=nnx.Rngs(0)))
    L.apply_lora(model, llm_rank=4, vit_rank=4, rngs=0)
    keys = set(peft_io.adapter_tensors(model))
    assert "base_model.model.language_model.model.layers.1.attention.wqkv.lora_A.weight" in keys
    assert "base_model.model.language_model.model.layers.0.feed_forward.w2.lora_B.weight" in keys
    assert "base_model.model.vision_model.encoder.layers.1.attn.qkv.lora_A.weight" in keys
    assert "base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * (5 + 4)
    targets = peft_io.adapter_config(model)["target_modules"]
    assert "qkv" in targets and "wqkv" in targets and "proj" in targets


# ---- upstream trainable counts on the real shapes (abstract: nothing allocated) ------------------


INTERNLM2_1_8B = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=92553,
                      hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=8, bias=False, rope_theta=1000000, max_position_embeddings=32768,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
PHI3_MINI = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=32064, hidden_size=3072,
                 intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.mark.parametrize("hf,rank,expected", [(INTERNLM2_1_8B, 128, 125_829_120), (INTERNLM2_1_8B, 16, 15_728_640),
                                              (PHI3_MINI, 16, 25_165_824)])
def test_trainable_counts(hf, rank, expected):
    cfg = config_from_hf(hf)
    assert cfg.head_dim * cfg.num_heads == cfg.hidden_size
    model = nnx.eval_shape(lambda: L.apply_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), llm_rank=rank, rngs=nnx.Rngs(1)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
    assert L.lora_param_count(model) == expected
    n_targets = {"internlm2": 5, "phi3": 4}[cfg.family]
    assert len(L.lora_modules(model)) == n_targets
