"""mmjax.data: sources, image tiling, chat templates + labels, and the sample dataset.

    ds = mmjax.data.build_dataset(config.data, tokenizer)      # grain.MapDataset of processed samples
    loader = mmjax.data.build_loader(...)                       # packing / batching (mmjax.data.pipeline)

Heavy imports are deferred so that ``import mmjax.data`` stays light.
"""

from mmjax.data.config import default_data_config, validate_data_config
from mmjax.data.samples import SampleError, SampleSource, SkipBudgetExceeded, build_dataset, run_check
from mmjax.data.tokenizer import build_qwen_test_tokenizer, ensure_internvl_tokens, load_tokenizer

__all__ = ["build_dataset", "build_loader", "default_data_config", "validate_data_config",
           "SampleError", "SampleSource", "SkipBudgetExceeded", "run_check", "build_qwen_test_tokenizer",
           "ensure_internvl_tokens", "load_tokenizer"]


def __getattr__(name):
    if name == "build_loader":
        from mmjax.data.pipeline import build_loader
        return build_loader
    raise AttributeError(f"module 'mmjax.data' has no attribute {name!r}")
