"""Checkpoint layouts: detection from ``config.json``, abstract model construction, source record.

Three layouts are understood:

* ``internvl_chat`` - upstream OpenGVLab InternVL-Chat (``model_type: internvl_chat``; keys
  ``vision_model.*``, ``mlp1.*``, ``language_model.*``; the LLM is named by ``llm_config``:
  InternLM2, Phi-3, Qwen2, Qwen3 or Llama).
* ``internvl_hf`` - transformers' own InternVL (``model_type: internvl``; keys ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.weight``; Qwen2/Qwen3 text).
* ``xcomposer2`` - InternLM-XComposer2 / 2.5 (``architectures: InternLMXComposer2ForCausalLM``;
  keys ``vit.vision_tower.vision_model.*``, ``vision_proj.*``, ``plora_*_GN``, ``model.*``, ``output.*``;
  read without running its remote code, sizes from the tensor shapes).
* ``causal_lm`` - a plain decoder checkpoint (internlm2, phi3, qwen3, qwen2, llama).

A layout may name *carried* tensors (:func:`carried_key`): ones the forward pass never reads,
which are not loaded and are written back byte for byte from the source checkpoint on save.

:class:`SourceRecord` is what a loaded model remembers about its checkpoint so
``save_pretrained`` can write the same layout back: a frozen, hashable dataclass stored as a static
attribute of the module (it lives in the ``GraphDef``, never in the state / pytree leaves).
"""

from __future__ import annotations

import dataclasses
import json
import os

from mmjax.weights.safetensors_io import CheckpointError

LAYOUTS = ("internvl_chat", "internvl_hf", "xcomposer2", "causal_lm")
SOURCE_ATTR = "hf_source"          # attribute name of the SourceRecord on a loaded model
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# Small files copied next to the weights on save (tokenizer, generation, processor, remote code).
AUX_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "qwen.tiktoken",
    "generation_config.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
AUX_SUFFIXES = (".py", ".tiktoken", ".jinja")


def aux_files(directory: str) -> list[str]:
    """Names of the tokenizer / generation / processor / remote-code files present in ``directory``."""
    if not os.path.isdir(directory):
        return []
    names = []
    for name in sorted(os.listdir(directory)):
        if not os.path.isfile(os.path.join(directory, name)):
            continue
        if name in AUX_FILES or name.endswith(AUX_SUFFIXES):
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------------
# Source record
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: str                    # safetensors dtype name ("BF16", "F32", ...)
    shape: tuple[int, ...]
    file: str                     # "model.safetensors" or the shard name


@dataclasses.dataclass(frozen=True, eq=True)
class SourceRecord:
    """Where a model came from. Hashable and static (stored in the GraphDef, not a pytree leaf)."""
    source_dir: str                                   # directory the aux files are copied from on save
    layout: str                                       # one of LAYOUTS
    config_json: str                                  # original config.json text
    tensors: tuple[TensorEntry, ...]                  # file by file, in the source's data order
    sharded: bool                                     # source had model.safetensors.index.json
    index_metadata_json: str | None = None            # the index's "metadata" (JSON text)
    file_metadata: tuple[tuple[str, str], ...] = ()   # (file, JSON of its __metadata__ or "null")
    _hash: int = dataclasses.field(default=0, compare=False, repr=False)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")
        object.__setattr__(self, "_hash", hash((self.source_dir, self.layout, self.config_json, self.tensors,
                                                 self.sharded, self.index_metadata_json, self.file_metadata)))

    def __hash__(self) -> int:      # cached: the record rides in the GraphDef, hashed per jit call
        return self._hash

    def __repr__(self) -> str:
        return (f"SourceRecord(source_dir={self.source_dir!r}, layout={self.layout!r}, "
                f"tensors={len(self.tensors)}, files={len(self.files)}, sharded={self.sharded})")

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.file for t in self.tensors))

    @property
    def index_metadata(self) -> dict | None:
        return None if self.index_metadata_json is None else json.loads(self.index_metadata_json)

    def metadata_of(self, file: str) -> dict | None:
        return json.loads(dict(self.file_metadata).get(file, "null"))

    def replace(self, **changes) -> "SourceRecord":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps({
            "source_dir": self.source_dir, "layout": self.layout, "config_json": self.config_json,
            "tensors": [[t.key, t.dtype, list(t.shape), t.file] for t in self.tensors],
            "sharded": self.sharded, "index_metadata_json": self.index_metadata_json,
            "file_metadata": [list(fm) for fm in self.file_metadata],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SourceRecord":
        d = json.loads(text)
        return cls(source_dir=d["source_dir"], layout=d["layout"], config_json=d["config_json"],
                   tensors=tuple(TensorEntry(k, dt, tuple(s), f) for k, dt, s, f in d["tensors"]),
                   sharded=d["sharded"], index_metadata_json=d["index_metadata_json"],
                   file_metadata=tuple(tuple(fm) for fm in d["file_metadata"]))


def source_record(model) -> SourceRecord | None:
    return getattr(model, SOURCE_ATTR, None)


def attach_record(model, record: SourceRecord) -> None:
    setattr(model, SOURCE_ATTR, record)


# ------------------------------------------------------------------------------------------------
# Layout detection
# ------------------------------------------------------------------------------------------------


def _families():
    from mmjax.models import families
    return families


def supported_text_models() -> list[str]:
    return sorted(k for k in _families().FAMILIES if k[:1].islower())


def _unsupported(what: str) -> CheckpointError:
    fams = ", ".join(supported_text_models())
    return CheckpointError(
        f"unsupported architecture {what}; supported: internvl_chat (upstream InternVL-Chat, LLM one of {fams}), "
        f"internvl / interns1 (transformers InternVL, Intern-S1-mini; Qwen2/Qwen3 text), or a causal LM of type {fams}")


# transformers' InternVL layout, and Intern-S1 / Intern-S1-mini's, which names every tensor the same
# way (model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head; XTuner's
# InternS1 modules carry these names) under its own model_type and remote code
HF_INTERNVL_TYPES = ("internvl", "interns1")
HF_INTERNVL_ARCHS = ("InternVLForConditionalGeneration", "InternS1ForConditionalGeneration")


def detect_layout(config: dict) -> str:
    """``internvl_chat`` | ``internvl_hf`` | ``causal_lm`` (CheckpointError listing the supported ones)."""
    mt = config.get("model_type")
    archs = config.get("architectures") or []
    from mmjax.models.xcomposer2 import is_xcomposer2
    if is_xcomposer2(config):
        return "xcomposer2"
    if mt == "internvl_chat" or "InternVLChatModel" in archs:
        _text_family(config.get("llm_config") or {}, context="llm_config of internvl_chat")
        return "internvl_chat"
    if mt in HF_INTERNVL_TYPES or any(a in archs for a in HF_INTERNVL_ARCHS):
        _text_family(config.get("text_config") or {}, context=f"text_config of {mt}")
        return "internvl_hf"
    _text_family(config, context=None)
    return "causal_lm"


def _text_family(text_config: dict, context: str | None):
    """The decoder family module for an HF text config (CheckpointError if unsupported)."""
    try:
        return _families().family_module(text_config)
    except ValueError:
        what = (text_config.get("architectures") or [None])[0] or text_config.get("model_type") or "(none given)"
        raise _unsupported(repr(what) + (f" in {context}" if context else "")) from None


# ------------------------------------------------------------------------------------------------
# Model construction
# ------------------------------------------------------------------------------------------------


def image_token_id(directory: str | None, config: dict) -> int | None:
    """Id of ``<IMG_CONTEXT>``: transformers' ``image_token_id``, else the tokenizer files (parsed as
    JSON, no code executed). ``None`` when neither names it (text-only use still works; the caller
    must then set the id before passing images)."""
    if config.get("image_token_id") is not None:
        return int(config["image_token_id"])
    if config.get("img_context_token_id") is not None:
        return int(config["img_context_token_id"])
    if not directory:
        return None

    def load(name):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    added = load("added_tokens.json")
    if isinstance(added, dict) and IMG_CONTEXT_TOKEN in added:
        return int(added[IMG_CONTEXT_TOKEN])
    tc = load("tokenizer_config.json")
    if isinstance(tc, dict):
        for tid, spec in (tc.get("added_tokens_decoder") or {}).items():
            if isinstance(spec, dict) and spec.get("content") == IMG_CONTEXT_TOKEN:
                return int(tid)
    tj = load("tokenizer.json")
    if isinstance(tj, dict):
        for spec in tj.get("added_tokens") or []:
            if isinstance(spec, dict) and spec.get("content") == IMG_CONTEXT_TOKEN:
                return int(spec["id"])
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and IMG_CONTEXT_TOKEN in vocab:
            return int(vocab[IMG_CONTEXT_TOKEN])
    return None


def model_factory(layout: str, config: dict, directory: str | None = None, options=None, **overrides):
    """``make(dtype, param_dtype, rngs) -> module`` for a layout and its config.json dict.

    ``options`` (:class:`mmjax.models.options.ModelOptions`) carries the run-time choices (remat,
    attention backend and block, ViT drop path, ``<IMG_CONTEXT>`` id) to the nested configs they
    belong to; ``overrides`` replace other fields of the top-level model config. A config.json that
    cannot describe a model (a missing field, heads that do not divide) is a ``CheckpointError``
    naming it."""
    try:
        return _model_factory(layout, config, directory, options, **overrides)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{_config_file(directory)}: lacks {e} (needed for a {layout} model)") from None
    except ValueError as e:
        raise CheckpointError(f"{_config_file(directory)}: {e}") from None


def _config_file(directory: str | None) -> str:
    return os.path.join(directory, "config.json") if directory else "the model config"


def _model_factory(layout: str, config: dict, directory: str | None, options, **overrides):
    from mmjax.models.options import ModelOptions
    options = options or ModelOptions()
    if layout == "causal_lm":
        from mmjax.models.decoder import CausalLM
        cfg = options.apply_text(_text_family(config, context=None).config_from_hf(config, **overrides))
        return lambda dtype, param_dtype, rngs: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if layout == "xcomposer2":
        from mmjax.models import xcomposer2
        cfg = xcomposer2.XComposer2Config.from_checkpoint(config, checkpoint_shapes(directory), **overrides)
        cfg = options.apply_xcomposer2(cfg)
        return lambda dtype, param_dtype, rngs: xcomposer2.XComposer2(cfg, dtype=dtype, param_dtype=param_dtype,
                                                                      rngs=rngs)
    from mmjax.models import internvl
    tok = options.img_context_token_id
    tok = image_token_id(directory, config) if tok is None else tok
    if layout == "internvl_chat":
        cfg = internvl.InternVLConfig.from_internvl_chat(config, image_token_id=tok, **overrides)
    elif layout == "internvl_hf":
        cfg = internvl.InternVLConfig.from_hf_internvl(config, image_token_id=tok, **overrides)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    cfg = options.apply_internvl(cfg)
    return lambda dtype, param_dtype, rngs: internvl.InternVL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def abstract_model(make):
    """``make()``'s module with abstract (``ShapeDtypeStruct``) parameters: no parameter memory.

    Non-parameter variables (buffers, RNG state), if the module has any, are materialised by running
    ``make`` under ``jax.jit`` and returning only them (XLA drops the unused parameter inits)."""
    import jax
    from flax import nnx

    model = nnx.eval_shape(make)
    if jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))):
        rest = jax.jit(lambda: nnx.state(make(), nnx.Not(nnx.Param)))()
        nnx.update(model, rest)
    return model


def build_abstract(layout: str, config: dict, dtype="float32", param_dtype=None, directory: str | None = None,
                   options=None, **overrides):
    """The model of ``layout`` / ``config`` with abstract parameters (see :func:`abstract_model`)."""
    from flax import nnx
    from mmjax.dtypes import model_dtype
    dtype = model_dtype(dtype)
    param_dtype = model_dtype(param_dtype, "param_dtype") or dtype
    make = model_factory(layout, config, directory, options, **overrides)
    return abstract_model(lambda: make(dtype, param_dtype, nnx.Rngs(0)))


def checkpoint_shapes(directory: str | None) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a checkpoint directory's tensors, from the safetensors headers alone."""
    if not directory:
        raise CheckpointError("this layout reads its sizes from the checkpoint's tensors: a directory is needed")
    from mmjax.weights.safetensors_io import ShardedReader
    reader = ShardedReader(directory)
    try:
        return {k: tuple(reader.info(k).shape) for k in reader.weight_map}
    finally:
        reader.close()


def carried_key(layout: str, key: str) -> bool:
    """Whether checkpoint tensor ``key`` is one ``layout`` carries unread (kept as is on save)."""
    if layout == "xcomposer2":
        from mmjax.models.xcomposer2 import carried_key as xc_carried
        return xc_carried(key)
    return False


def key_canonicalizer(layout: str):
    """``checkpoint key -> key of weight_rules`` for ``layout``. transformers' InternVL
    ``save_pretrained`` writes older spellings (``language_model.model.*``, ``vision_tower.*``) of
    its in-memory names; the loader maps them, the saver writes the checkpoint's own spelling back."""
    if layout == "internvl_hf":
        from mmjax.models.internvl import canonical_hf_key
        return canonical_hf_key
    return lambda key: key


def weight_table(model):
    """``{hf_key: (rule, layer_index)}`` of every checkpoint tensor the model expects."""
    from mmjax.weights.rules import expand
    rules = model.weight_rules()
    table = {}
    for key, rule, layer in expand(rules, model.num_layers_map()):
        if key in table:
            raise ValueError(f"two weight rules produce the key {key}")
        table[key] = (rule, layer)
    return table
