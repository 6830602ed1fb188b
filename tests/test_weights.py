"""Weights IO: layout detection, streaming load, bit-exact save, shards, orbax round trip, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmjax
from mmjax.weights import layouts
from mmjax.weights.safetensors_io import CheckpointError, ShardedReader, read_array, read_raw
from tests import hf_fixtures as hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.array([[1, 5, 7, 9, 11, 3, 42, 17]], dtype=np.int32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / b.std())


def assert_same_tensors(src: str, out: str) -> None:
    """Same keys, same file for each key, same dtype/shape, same raw bytes."""
    r1, r2 = ShardedReader(src), ShardedReader(out)
    assert r1.weight_map == r2.weight_map
    for key, fname in r1.weight_map.items():
        i1, i2 = r1.info(key), r2.info(key)
        assert (i1.dtype, i1.shape) == (i2.dtype, i2.shape), key
        assert read_raw(os.path.join(src, fname), i1) == read_raw(os.path.join(out, fname), i2), key


def tensor_dtypes(path: str) -> set[str]:
    r = ShardedReader(path)
    return {r.info(k).dtype for k in r.weight_map}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Built lazily and once: {name: (dir, torch_model)}."""
    root = tmp_path_factory.mktemp("ckpts")
    cache = {}

    def get(name):
        if name not in cache:
            model, _, _ = hf.build(name)
            cache[name] = (hf.save(name, root / name), model)
        return cache[name]
    return get


# ------------------------------------------------------------------------------------------------
# Plain causal LMs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3", "phi3", "internlm2", "llama"])
def test_causal_lm_load_logits_and_bitexact_save(name, ckpts, tmp_path):
    src, torch_model = ckpts(name)
    model = mmjax.from_pretrained(src)
    rec = layouts.source_record(model)
    assert rec.layout == "causal_lm" and not rec.sharded
    assert rel_err(model(jnp.asarray(IDS)), hf.hf_logits(torch_model, IDS)) <= 1e-3
    out = mmjax.save_pretrained(model, tmp_path / "out")
    assert_same_tensors(src, out)
    with open(os.path.join(src, "config.json")) as a, open(os.path.join(out, "config.json")) as b:
        assert a.read() == b.read()
    assert sorted(layouts.aux_files(src)) == sorted(layouts.aux_files(out))


def test_saved_checkpoint_loads_in_transformers(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM
    src, torch_model = ckpts("qwen3")
    out = mmjax.save_pretrained(mmjax.from_pretrained(src), tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf.hf_logits(back, IDS), hf.hf_logits(torch_model, IDS))


def test_sharded_round_trip_preserves_shard_map(ckpts, tmp_path):
    _, torch_model = ckpts("qwen3")
    src = str(tmp_path / "sharded")
    torch_model.save_pretrained(src, max_shard_size="20KB")
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) >= 3           # really sharded
    model = mmjax.from_pretrained(src)
    assert layouts.source_record(model).sharded
    assert rel_err(model(jnp.asarray(IDS)), hf.hf_logits(torch_model, IDS)) <= 1e-3
    out = mmjax.save_pretrained(model, tmp_path / "out")
    assert_same_tensors(src, out)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index_out = json.load(f)
    assert index_out == index
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == \
        sorted(set(index["weight_map"].values()))


def test_bf16_checkpoint(ckpts, tmp_path):
    import torch
    _, torch_model = ckpts("phi3")
    src = str(tmp_path / "bf16")
    hf.build("phi3")[0].to(torch.bfloat16).save_pretrained(src)
    assert tensor_dtypes(src) == {"BF16"}
    # float32 params from a bf16 file: exact widening, written back as BF16 bit for bit.
    m32 = mmjax.from_pretrained(src)
    assert m32.embed_tokens.get_value().dtype == jnp.float32
    assert_same_tensors(src, mmjax.save_pretrained(m32, tmp_path / "out32"))
    # dtype="bfloat16": bf16 params, also exact.
    m16 = mmjax.from_pretrained(src, dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    assert_same_tensors(src, mmjax.save_pretrained(m16, tmp_path / "out16"))
    # the raw-byte reader (fallback for dtypes safe_open's numpy path lacks) agrees with safe_open
    reader = ShardedReader(src)
    key = "model.embed_tokens.weight"
    np.testing.assert_array_equal(read_array(os.path.join(src, "model.safetensors"), reader.info(key)), reader.get(key))
    assert torch_model is not None


def test_save_dtype_override_updates_config(ckpts, tmp_path):
    src, _ = ckpts("internlm2")
    out = mmjax.save_pretrained(mmjax.from_pretrained(src), tmp_path / "out", dtype="bfloat16")
    assert tensor_dtypes(out) == {"BF16"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back = mmjax.from_pretrained(out)
    ref = mmjax.from_pretrained(src)
    w, w_ref = back.embed_tokens.get_value(), ref.embed_tokens.get_value()
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w_ref.astype(jnp.bfloat16).astype(jnp.float32)))


# ------------------------------------------------------------------------------------------------
# InternVL layouts
# ------------------------------------------------------------------------------------------------


def _internvl_inputs():
    from tests import hf_fixtures_internvl as F
    ids = np.array([[1, 5] + [F.IMAGE_TOKEN_ID] * F.TOKENS_PER_TILE + [7, 9, 11]], dtype=np.int32)
    pix = np.random.default_rng(0).standard_normal((1, F.IMAGE_SIZE, F.IMAGE_SIZE, 3)).astype(np.float32)
    return ids, pix


def _torch_internvl_logits(model, ids, pix):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                     pixel_values=torch.as_tensor(pix.transpose(0, 3, 1, 2))).logits.float().numpy()


def test_internvl_chat_upstream_layout(tmp_path):
    from tests import hf_fixtures_internvl as F
    src, torch_model = F.make_upstream_internvl(str(tmp_path / "up"), vit="300m", text="qwen3")
    # the upstream directory names <IMG_CONTEXT> only through its tokenizer files; remote code rides along
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {str(F.IMAGE_TOKEN_ID): {"content": "<IMG_CONTEXT>", "special": True}}}, f)
    with open(os.path.join(src, "modeling_internvl_chat.py"), "w") as f:
        f.write("# remote code placeholder\n")
    model = mmjax.from_pretrained(src)
    assert layouts.source_record(model).layout == "internvl_chat"
    assert model.cfg.img_context_token_id == F.IMAGE_TOKEN_ID
    ids, pix = _internvl_inputs()
    out = model(jnp.asarray(ids), pixel_values=jnp.asarray(pix))
    assert rel_err(out, _torch_internvl_logits(torch_model, ids, pix)) <= 1e-3
    out_dir = mmjax.save_pretrained(model, tmp_path / "out")
    assert_same_tensors(src, out_dir)
    for name in ("tokenizer_config.json", "modeling_internvl_chat.py"):
        assert os.path.isfile(os.path.join(out_dir, name)), name


def test_internvl_hf_layout_sharded(tmp_path):
    from tests import hf_fixtures_internvl as F
    torch_model = F.build_hf_model(vit="300m", text="qwen3")
    src = str(tmp_path / "hf")
    torch_model.save_pretrained(src, max_shard_size="60KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    model = mmjax.from_pretrained(src)
    rec = layouts.source_record(model)
    assert rec.layout == "internvl_hf" and rec.sharded and len(rec.files) >= 2
    assert model.cfg.img_context_token_id == F.IMAGE_TOKEN_ID            # from config image_token_id
    ids, pix = _internvl_inputs()
    out = model(jnp.asarray(ids), pixel_values=jnp.asarray(pix))
    assert rel_err(out, _torch_internvl_logits(torch_model, ids, pix)) <= 1e-3
    out_dir = mmjax.save_pretrained(model, tmp_path / "out")
    assert_same_tensors(src, out_dir)      # transformers' on-disk key spelling and shard map kept


# ------------------------------------------------------------------------------------------------
# Source record, placement, from-scratch save
# ------------------------------------------------------------------------------------------------


def test_source_record_is_static_and_survives_split_merge(ckpts):
    src, _ = ckpts("qwen3")
    model = mmjax.from_pretrained(src)
    rec = layouts.source_record(model)
    assert rec.source_dir == os.path.abspath(src)
    assert json.loads(rec.config_json)["model_type"] == "qwen3"
    assert {t.file for t in rec.tensors} == {"model.safetensors"}
    assert all(t.dtype == "F32" for t in rec.tensors)
    hash(rec)
    assert not any(isinstance(x, layouts.SourceRecord) for x in jax.tree.leaves(model))
    assert not any(isinstance(x, layouts.SourceRecord) for x in jax.tree.leaves(nnx.state(model)))
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    assert layouts.source_record(merged) == rec
    assert layouts.SourceRecord.from_json(rec.to_json()) == rec

    @jax.jit
    def f(state, ids):
        return nnx.merge(graphdef, state)(ids)
    np.testing.assert_allclose(np.asarray(f(state, IDS)), np.asarray(model(IDS)), rtol=1e-5, atol=1e-5)


def test_sharding_fn_places_each_parameter(ckpts):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    src, _ = ckpts("qwen3")
    mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    seen = []

    def sharding_fn(path, shape, dtype):
        seen.append((path, tuple(shape), np.dtype(dtype)))
        return NamedSharding(mesh, P("fsdp") if len(shape) > 1 else P())

    model = mmjax.from_pretrained(src, sharding_fn=sharding_fn)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(seen) == len(params)
    assert all(isinstance(x.sharding, NamedSharding) for x in params)
    assert model.embed_tokens.get_value().sharding.spec == P("fsdp")
    paths = {p for p, _, _ in seen}
    assert ("embed_tokens",) in paths
    stacked = [s for p, s, _ in seen if p[0] == "layers"]
    assert stacked and all(s[0] == hf.LAYERS for s in stacked)     # whole stack placed once


@pytest.mark.parametrize("xla_from", [0, 1 << 40])
def test_shard_reader_reads_exactly_the_requested_slice(ckpts, monkeypatch, xla_from):
    """A shard is read for any index: stacked parameters across their layer tensors, linear kernels
    transposed (by XLA or numpy: ``xla_from`` moves the size threshold), whole HF rows read from the
    file, other slices copied from the mapped tensor, cast to the parameter dtype."""
    import ml_dtypes
    from mmjax.weights import loader
    from mmjax.weights.rules import to_mmjax
    monkeypatch.setattr(loader, "XLA_TRANSPOSE_ELEMENTS", xla_from)
    src, _ = ckpts("internlm2")
    reader = ShardedReader(src)
    model = layouts.build_abstract("causal_lm", json.load(open(os.path.join(src, "config.json"))))
    by_path = {}
    for key, (rule, layer) in layouts.weight_table(model).items():
        by_path.setdefault(rule.path, (rule, {}))[1][layer] = key
    rule, keys = by_path[("layers", "mlp", "gate_proj", "kernel")]       # stacked, linear
    full = np.stack([to_mmjax(rule, reader.get(keys[i])) for i in range(hf.LAYERS)])
    read = loader._shard_reader(reader, rule, keys, full.shape, np.dtype(np.float32))
    for index in [(slice(None),) * 3,
                  (slice(1, 2), slice(8, 40), slice(0, 56)),      # HF rows 0:56, columns 8:40: mapped copy
                  (slice(None), slice(None), slice(56, 112)),     # whole HF rows 56:112: one readinto
                  (slice(0, 1),)]:
        np.testing.assert_array_equal(read(index), full[index])
    rule, keys = by_path[("embed_tokens",)]                                  # plain, no transform
    full = reader.get(keys[None])
    read = loader._shard_reader(reader, rule, keys, full.shape, np.dtype(ml_dtypes.bfloat16))
    got = read((slice(24, 48), slice(None)))
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (24, full.shape[1])
    np.testing.assert_array_equal(got, full[24:48].astype(ml_dtypes.bfloat16))


def test_from_pretrained_places_each_parameter_on_the_mesh(ckpts, tmp_path):
    """``mesh=``: every parameter arrives in the sharding of its logical axes (8 CPU devices, a
    (2, 2, 2) mesh), with the values of a one-device load."""
    src, _ = ckpts("internlm2")
    script = tmp_path / "mesh_load.py"
    script.write_text(f"""
import numpy as np, jax
from flax import nnx
import mmjax
from mmjax import sharding as shd
from mmjax.train.state import param_shardings
mesh = shd.make_mesh(2, 2, 2)
one = nnx.to_flat_state(nnx.state(mmjax.from_pretrained({str(src)!r}), nnx.Param))
model = mmjax.from_pretrained({str(src)!r}, mesh=mesh)
params = nnx.state(model, nnx.Param)
want = dict(nnx.to_flat_state(param_shardings(params, mesh)))
split = 0
for (path, var), (_, ref) in zip(nnx.to_flat_state(params), one):
    x = var.get_value()
    assert x.sharding == want[path].get_value(), (path, x.sharding, want[path].get_value())
    assert len(x.addressable_shards) == 8
    split += x.sharding.spec != jax.sharding.PartitionSpec(*[None] * x.ndim)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref.get_value()))
print("OK", split, len(one))
""")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ok, split, total = p.stdout.split()[-3:]
    assert ok == "OK" and int(split) >= int(total) // 2     # most parameters are really split


def test_replication_check_names_the_parameters_a_mesh_cannot_split():
    from types import SimpleNamespace
    from mmjax.sharding import ShardingError, check_replication
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 3, "tensor": 1})
    leaves = [("embed", ("vocab", "embed"), (96, 64), np.float32),      # 64 % 3: not split
              ("mlp", ("embed", "mlp"), (63, 112), np.float32),         # split
              ("norm", ("norm",), (64,), np.float32)]                   # replicated by rule
    with pytest.raises(ShardingError, match=r"30\.9% .* embed \(0\.0 MiB, 0\.0 MiB more per device\): "
                                            r"dim 1 \(embed\) = 64 not divisible by 3"):
        check_replication(leaves, mesh)
    leaves[0] = ("embed", ("vocab", "embed"), (96, 63), np.float32)
    leaves.append(("odd", ("embed",), (4,), np.float32))                # 16 bytes of 54 KiB: a warning
    warnings = check_replication(leaves, mesh)
    assert len(warnings) == 1 and "odd" in warnings[0] and "dim 0 (embed) = 4 not divisible by 3" in warnings[0]


def test_model_without_record_is_savable(ckpts, tmp_path):
    """A model built from a config (no source record) saves from its own weight_rules.

    (Loaded then stripped of its record: an eagerly initialised model would cost seconds of init.)"""
    from safetensors.numpy import load_file
    src, _ = ckpts("llama")
    model = mmjax.from_pretrained(src)
    model.hf_source = None
    with pytest.raises(CheckpointError, match="layout="):
        mmjax.save_pretrained(model, tmp_path / "nope")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    out = mmjax.save_pretrained(model, tmp_path / "out", layout="causal_lm", hf_config=config, max_shard_size=20_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) >= 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n) for n in shards)
    ref = load_file(os.path.join(src, "model.safetensors"))
    got = {}
    for n in shards:
        got.update(load_file(os.path.join(out, n)))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert layouts.source_record(mmjax.from_pretrained(out)).sharded


def test_abstract_build_materialises_buffers_and_loads_generic_rules(tmp_path):
    """Non-parameter variables come out concrete; any module with weight_rules loads."""
    from safetensors.numpy import save_file
    from mmjax.weights.loader import load_into
    from mmjax.weights.rules import TensorRule

    class Toy(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 4)))
            self.stack = nnx.Param(jnp.zeros((2, 5)))
            self.buf = nnx.Variable(jnp.arange(4.0))

        def weight_rules(self):
            return [TensorRule("w.weight", ("w",), "linear"), TensorRule("s.{i}.bias", ("stack",))]

        def num_layers_map(self):
            return {("stack",): 2}

    model = layouts.abstract_model(lambda: Toy(nnx.Rngs(0)))
    assert isinstance(model.w.get_value(), jax.ShapeDtypeStruct)
    np.testing.assert_array_equal(np.asarray(model.buf.get_value()), np.arange(4.0))
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_file({"w.weight": w, "s.0.bias": np.full(5, 1, np.float32), "s.1.bias": np.full(5, 2, np.float32)},
              str(tmp_path / "model.safetensors"))
    load_into(model, ShardedReader(str(tmp_path)))
    np.testing.assert_array_equal(np.asarray(model.w.get_value()), w.T)
    np.testing.assert_array_equal(np.asarray(model.stack.get_value()), [[1] * 5, [2] * 5])


# ------------------------------------------------------------------------------------------------
# Orbax round trip (functions and CLIs)
# ------------------------------------------------------------------------------------------------


def test_orbax_round_trip_bitexact(ckpts, tmp_path):
    from mmjax.weights import orbax_io
    _, torch_model = ckpts("qwen3")
    src = str(tmp_path / "sharded")
    torch_model.save_pretrained(src, max_shard_size="40KB")
    ck = orbax_io.hf_to_orbax(src, tmp_path / "orbax")
    assert os.path.isfile(os.path.join(ck, orbax_io.SIDECAR))
    shutil.move(src, str(tmp_path / "gone"))      # the HF source may be gone by export time
    out = orbax_io.orbax_to_hf(ck, tmp_path / "out")
    assert_same_tensors(str(tmp_path / "gone"), out)
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    out16 = orbax_io.orbax_to_hf(ck, tmp_path / "out16", dtype="bfloat16")
    assert tensor_dtypes(out16) == {"BF16"}


def test_convert_clis(ckpts, tmp_path):
    src, _ = ckpts("internlm2")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for cmd in (["tools/convert_weights/hf_to_mmjax.py", f"--hf_dir={src}", f"--out_dir={tmp_path / 'ck'}"],
                ["tools/convert_weights/mmjax_to_hf.py", f"--ckpt_dir={tmp_path / 'ck'}", f"--out_dir={tmp_path / 'hf'}"]):
        r = subprocess.run([sys.executable] + cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    assert_same_tensors(src, str(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------------
# Errors: one line, naming the file or tensor
# ------------------------------------------------------------------------------------------------


def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _raises(path, pattern, **kw):
    with pytest.raises(CheckpointError, match=pattern) as e:
        mmjax.from_pretrained(path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_error_missing_key(ckpts, tmp_path):
    d = _copy(ckpts("qwen3")[0], tmp_path / "c")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _raises(d, r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors")


def test_error_unexpected_key(ckpts, tmp_path):
    d = _copy(ckpts("qwen3")[0], tmp_path / "c")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.extra", np.zeros(3, np.float32)))
    _raises(d, r"unexpected tensor model\.layers\.0\.self_attn\.rotary\.extra in model\.safetensors")


def test_error_shape_mismatch(ckpts, tmp_path):
    d = _copy(ckpts("qwen3")[0], tmp_path / "c")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", np.ones(65, np.float32)))
    _raises(d, r"model\.norm\.weight.*\(65,\).*\(64,\)")


def test_error_lora_keys(ckpts, tmp_path):
    d = _copy(ckpts("qwen3")[0], tmp_path / "c")

    def edit(t):
        w = t.pop("model.layers.0.self_attn.q_proj.weight")
        t["model.layers.0.self_attn.q_proj.base_layer.weight"] = w
        t["model.layers.0.self_attn.q_proj.lora_A.default.weight"] = np.zeros((4, w.shape[1]), np.float32)
    _rewrite(d, edit)
    _raises(d, r"q_proj\.(base_layer|lora_A).*merge")


def test_error_truncated_file(ckpts, tmp_path):
    d = _copy(ckpts("qwen3")[0], tmp_path / "c")
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    _raises(d, r"model\.safetensors: truncated")
    with open(f, "r+b") as fh:        # a header length beyond the file
        fh.write((10 ** 9).to_bytes(8, "little"))
    _raises(d, r"model\.safetensors: truncated or corrupt")


def test_error_corrupt_header(ckpts, tmp_path):
    d = _copy(ckpts("qwen3")[0], tmp_path / "c")
    f = os.path.join(d, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe not json")
    _raises(d, r"model\.safetensors: corrupt")


def test_error_missing_shard(ckpts, tmp_path):
    _, torch_model = ckpts("qwen3")
    d = str(tmp_path / "sharded")
    torch_model.save_pretrained(d, max_shard_size="40KB")
    from safetensors.numpy import load_file, save_file
    shards = sorted(n for n in os.listdir(d) if n.startswith("model-"))
    first = load_file(os.path.join(d, shards[0]))
    dropped = sorted(first)[0]
    save_file({k: v for k, v in first.items() if k != dropped}, os.path.join(d, shards[0]), metadata={"format": "pt"})
    _raises(d, rf"missing tensor {re.escape(dropped)} in {re.escape(shards[0])} \(listed there by "
               rf"model\.safetensors\.index\.json\)")
    os.remove(os.path.join(d, shards[1]))
    _raises(d, rf"missing shard {re.escape(shards[1])} \(listed in model\.safetensors\.index\.json\)")


def test_error_unsupported_architecture(ckpts, tmp_path):
    d = _copy(ckpts("qwen3")[0], tmp_path / "c")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, f)
    msg = _raises(d, r"unsupported architecture 'GPT2LMHeadModel'")
    for fam in ("internlm2", "phi3", "qwen3", "qwen2", "llama", "internvl_chat"):
        assert fam in msg
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "internvl_chat", "llm_config": {"architectures": ["MixtralForCausalLM"]}}, f)
    _raises(d, r"unsupported architecture 'MixtralForCausalLM' in llm_config")


def test_error_bin_only(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (d / "pytorch_model.bin").write_bytes(b"\x00" * 16)
    _raises(str(d), r"pytorch_model\.bin.*safe_serialization=True")


def test_error_missing_config_and_directory(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    _raises(str(d), r"missing config\.json")
    _raises(str(tmp_path / "Mini-InternVL-Chat-2B-V1-5"),
            r"does not exist.*huggingface-cli download OpenGVLab/Mini-InternVL-Chat-2B-V1-5 "
            r"--local-dir pretrained/Mini-InternVL-Chat-2B-V1-5")


def test_error_bad_dtype(ckpts):
    with pytest.raises(ValueError, match="float16"):
        mmjax.from_pretrained(ckpts("qwen3")[0], dtype="float16")


def test_image_token_id_from_tokenizer_files(tmp_path):
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<img>": 32011, "<IMG_CONTEXT>": 32013}))
    assert layouts.image_token_id(str(tmp_path), {}) == 32013
    os.remove(tmp_path / "added_tokens.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"92546": {"content": "<IMG_CONTEXT>", "special": True}}}))
    assert layouts.image_token_id(str(tmp_path), {}) == 92546
    os.remove(tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 151667, "content": "<IMG_CONTEXT>"}]}))
    assert layouts.image_token_id(str(tmp_path), {}) == 151667
    assert layouts.image_token_id(str(tmp_path), {"image_token_id": 7}) == 7
    assert layouts.image_token_id(str(tmp_path / "none"), {}) is None
