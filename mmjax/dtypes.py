"""The dtypes a model computes in and keeps its parameters in, by the names configs and the API use.

One table for the whole package: ``from_pretrained(dtype=..., param_dtype=...)``, the trainer's
``config.model.dtype`` / ``param_dtype`` / ``frozen_param_dtype`` and the model factories all
resolve names here. (What a safetensors file stores is the file format's own table, in
``weights/safetensors_io.py``.)
"""

from __future__ import annotations

MODEL_DTYPES = ("float32", "bfloat16")


def model_dtype(name, what: str = "dtype"):
    """``'float32'`` / ``'bfloat16'`` (or the jnp dtype itself) -> the jnp dtype; ValueError naming
    ``what`` otherwise. ``None`` passes through (callers default it)."""
    import jax.numpy as jnp   # deferred: `import mmjax` stays light

    if name is None:
        return None
    if isinstance(name, str):
        if name in MODEL_DTYPES:
            return getattr(jnp, name)
    else:
        for n in MODEL_DTYPES:
            if jnp.dtype(name) == jnp.dtype(getattr(jnp, n)):
                return getattr(jnp, n)
    raise ValueError(f"{what} must be one of {tuple(MODEL_DTYPES)}, got {name!r}")
