"""Convert an HF checkpoint directory to an mmjax orbax checkpoint (+ source sidecar).

    python tools/convert_weights/hf_to_mmjax.py --hf_dir=pretrained/Mini-InternVL-Chat-2B-V1-5 --out_dir=workdir/mini2b_orbax [--dtype=bfloat16]

The output holds ``params/`` (orbax), ``mmjax_source.json`` (layout, config.json text, tensor dtypes
and shard map) and ``hf_files/`` (tokenizer etc.), so ``mmjax_to_hf.py`` can write the HF layout back.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from absl import app, flags  # noqa: E402

FLAGS = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + safetensors)."), \
    flags.DEFINE_string("out_dir", None, "Output orbax checkpoint directory."), \
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype to store.")


def main(argv):
    del argv
    from mmjax.weights.orbax_io import hf_to_orbax
    hf_dir, out_dir, dtype = (f.value for f in FLAGS)
    out = hf_to_orbax(hf_dir, out_dir, dtype=dtype)
    print(f"wrote {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_dir", "out_dir"])
    app.run(main)
