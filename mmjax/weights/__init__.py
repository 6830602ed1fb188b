"""HF <-> mmjax weights: layout detection, per-family tensor rules, streaming safetensors IO."""

from mmjax.weights.layouts import SourceRecord
from mmjax.weights.loader import from_pretrained
from mmjax.weights.safetensors_io import CheckpointError
from mmjax.weights.saver import save_pretrained

__all__ = ["CheckpointError", "SourceRecord", "from_pretrained", "save_pretrained"]
