"""Meshes are placements, not other models: on 8 simulated CPU devices the meshes (8,1,1),
(2,4,1), (2,2,2) and (1,4,2) (data, fsdp, tensor) give the 1-device loss and gradients, full
fine-tuning and LoRA; the rule table is overridable from the config; activations carry their
constraints on a multi-device mesh and none on one device.

The matrix runs in one subprocess (the device count is fixed when JAX starts): ``python -m
tests.test_mesh WORKDIR OUT_JSON``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
KERNELS = ("pallas_gpu", "splash")   # attention backends that run per shard (the others: XLA partitions them)
MODES = {"full": {}, "lora": {"lora.llm_rank": 4, "lora.vit_rank": 2, "lora.dropout": 0.0,
                              "freeze.backbone": True, "freeze.mlp": True, "freeze.llm": True}}


def _config(mode: str, mesh: tuple[int, int, int]):
    from tests.test_train import tiny_config
    data, fsdp, tensor = mesh
    # the tiny tokenizer's vocabulary (339) does not split in two: replicated on purpose, as the
    # start-up check advises (a rule override from the config)
    rules = {"mesh.rules.vocab": ""} if tensor > 1 else {}
    # the plain XLA attention and one ViT call: a third of the compile time on 2 cores (the
    # default blockwise kernel and tile groups run on a mesh in test_train's two-process run)
    fast = {"model.attention": "xla", "model.vit_attention": "xla", "model.vit_tile_chunk": 0}
    return tiny_config(**MODES[mode], **rules, **fast, **{"data.batch_size": 8, "mesh.data": data,
                                                         "mesh.fsdp": fsdp, "mesh.tensor": tensor, "total_steps": 3})


def _loss_and_grads(run, batch):
    """The step's loss and gradients for ``batch`` (no optimizer), traced under the run's rules."""
    import jax
    from flax import nnx

    from mmjax import sharding as shd
    from mmjax.train import step as step_lib

    def loss(params):
        model = nnx.merge(run.graphdef, params, run.frozen, run.rest, copy=True)
        lsum, wsum, _, _ = step_lib.micro_loss(model, batch, None, run.cfg.loss_chunk_size, train=False)
        return lsum / wsum

    return jax.jit(shd.traced_with(jax.value_and_grad(loss), run.rules, run.mesh))(run.state.params)


def main(workdir: str, out: str) -> None:
    import jax

    from mmjax.train.setup import build_run

    result = {}
    for mode in MODES:
        for mesh in [(1, 1, 1)] + MESHES:
            run = build_run(_config(mode, mesh), jax.devices()[:int(np.prod(mesh))], workdir=workdir)
            batch = run.to_global(next(run.loader))
            loss, grads = _loss_and_grads(run, batch)
            flat = {"/".join(map(str, k)): np.asarray(jax.device_get(v))
                    for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
            constraints = run.lower().as_text().count("sharding_constraint")
            np.savez(f"{out}.{mode}.{'x'.join(map(str, mesh))}.npz", **flat)
            result[f"{mode} {mesh}"] = {"loss": float(loss), "constraints": constraints}
            run.loader.close()
    result["kernels"] = _kernels_on_a_mesh()
    Path(out).write_text(json.dumps(result))


def _kernels_on_a_mesh() -> dict:
    """Each attention backend on packed rows under a (2,2,2) mesh (rows over data x fsdp, heads
    over tensor; the Pallas kernels per shard) against the same call on one device: the largest
    difference of the outputs and of the gradients, relative to their scale."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mmjax import sharding as shd
    from mmjax.models import attention

    b, t, hq, hkv, d = 4, 200, 4, 2, 32
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, t, hq, d))
    k, v = jax.random.normal(ks[1], (b, t, hkv, d)), jax.random.normal(ks[2], (b, t, hkv, d))
    ct = jax.random.normal(ks[3], (b, t, hq, d))
    lengths = [(90, 90), (200,), (50, 60, 70), (120,)]
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for r, parts in enumerate(lengths):
        start = 0
        for i, n in enumerate(parts):
            seg[r, start:start + n], pos[r, start:start + n] = i + 1, np.arange(n)
            start += n
    mesh = shd.make_mesh(2, 2, 2)
    out = {}
    for name in KERNELS:
        backend = attention.get_backend(name)

        def f(q, k, v, seg, pos):
            o = backend.attend(q, k, v, backend.prepare(seg, pos), scale=d ** -0.5, block=64)
            return jnp.sum(o * ct), o

        grad = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
        (_, o1), g1 = jax.jit(grad)(q, k, v, seg, pos)
        rows = NamedSharding(mesh, P(("data", "fsdp")))
        placed = [jax.device_put(x, rows) for x in (q, k, v, seg, pos)]
        (_, o8), g8 = jax.jit(shd.traced_with(grad, shd.LOGICAL_RULES, mesh))(*placed)
        rel = lambda a, r: float(np.abs(np.asarray(a) - np.asarray(r)).max() / max(np.abs(np.asarray(r)).max(), 1e-12))
        out[name] = max([rel(o8, o1)] + [rel(a, r) for a, r in zip(g8, g1)])
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from mmjax.data.embedded import prepare_embedded
    from tests.test_train import tiny_config

    base = tmp_path_factory.mktemp("mesh")
    prepare_embedded(tiny_config(), str(base))
    out = base / "matrix.json"
    # backend optimisation off: a third less compile time, the same float32 arithmetic
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    p = subprocess.run([sys.executable, "-m", "tests.test_mesh", str(base), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text()), out


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mesh_gives_the_one_device_loss_and_gradients(matrix, mode):
    result, out = matrix
    ref = result[f"{mode} (1, 1, 1)"]
    ref_grads = np.load(f"{out}.{mode}.1x1x1.npz")
    assert ref["constraints"] == 0            # one device: the program carries no constraints
    for mesh in MESHES:
        got = result[f"{mode} {mesh}"]
        assert got["constraints"] > 0, mesh
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), mesh
        grads = np.load(f"{out}.{mode}.{'x'.join(map(str, mesh))}.npz")
        assert sorted(grads.files) == sorted(ref_grads.files)
        for name in ref_grads.files:
            g, r = grads[name], ref_grads[name]
            scale = max(float(np.abs(r).max()), 1e-12)
            # relative to the tensor's scale: float32 sums taken in another order (per-device partials)
            assert float(np.abs(g - r).max()) <= 1e-4 * scale, (mesh, name, float(np.abs(g - r).max()), scale)


def test_pallas_kernels_on_a_mesh_match_one_device(matrix):
    """The Pallas kernels run per shard (shard_map; XLA cannot partition them): on a (2,2,2) mesh
    they give the 1-device outputs and gradients (interpret mode on CPU)."""
    result, _ = matrix
    assert sorted(result["kernels"]) == sorted(KERNELS)
    for name, rel in result["kernels"].items():
        assert rel <= 1e-5, (name, rel)


def test_rule_table_is_overridable_from_the_config():
    from mmjax import sharding as shd
    from mmjax.train.setup import ConfigError, validate_config
    from tests.test_train import tiny_config

    rules = shd.rules_from_config({"vocab": "fsdp", "batch": "data", "act_mlp": "", "tiles": "data,fsdp"})
    assert rules["vocab"] == "fsdp" and rules["batch"] == "data" and rules["act_mlp"] is None
    assert rules["tiles"] == ("data", "fsdp") and rules["embed"] == shd.LOGICAL_RULES["embed"]
    assert shd.rules_from_config(shd.rules_as_config()) == shd.LOGICAL_RULES
    mesh = shd.make_mesh(1, 1, 1)
    spec = shd.logical_to_spec(("vocab", "embed"), (8, 4), mesh, rules=rules)
    assert tuple(spec) == ("fsdp", None)       # embed's fsdp is taken by vocab first
    with shd.use_rules(rules, mesh):
        assert shd.current_rules() is rules
    assert shd.current_rules() is shd.LOGICAL_RULES

    cfg = tiny_config(**{"mesh.rules.embed": "data,tensor"})
    assert validate_config(cfg)["embed"] == ("data", "tensor")
    with pytest.raises(ConfigError, match=r"config.mesh.rules.embed='fsdp,gpu': mesh axes must be distinct"):
        validate_config(tiny_config(**{"mesh.rules.embed": "fsdp,gpu"}))
    with pytest.raises(ValueError, match="unknown logical axis"):
        shd.rules_from_config({"embedding": "fsdp"})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
