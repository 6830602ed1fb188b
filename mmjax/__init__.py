"""mmjax: fine-tune InternVL-family multimodal LLMs in JAX / Flax NNX.

Public API: ``from_pretrained`` and ``save_pretrained`` (imported lazily so ``import mmjax`` stays light).
"""

__version__ = "0.1.0"


def from_pretrained(path, dtype="float32", **kwargs):
    """Load an HF checkpoint directory (InternVL-Chat, transformers InternVL, or a causal LM)."""
    from mmjax.weights.loader import from_pretrained as _load
    return _load(path, dtype=dtype, **kwargs)


def save_pretrained(model, out_dir, **kwargs):
    """Write ``model`` in the HF layout it was loaded from."""
    from mmjax.weights.saver import save_pretrained as _save
    return _save(model, out_dir, **kwargs)
