"""Write an mmjax orbax checkpoint (from hf_to_mmjax.py) back as an HF checkpoint directory.

    python tools/convert_weights/mmjax_to_hf.py --ckpt_dir=workdir/mini2b_orbax --out_dir=export/mini2b [--dtype=bfloat16]

The layout, key names, shard files and config.json are those of the checkpoint originally
converted; ``--dtype`` converts every floating tensor (default: each tensor's original dtype).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from absl import app, flags  # noqa: E402

FLAGS = flags.DEFINE_string("ckpt_dir", None, "orbax checkpoint directory written by hf_to_mmjax.py."), \
    flags.DEFINE_string("out_dir", None, "Output HF checkpoint directory."), \
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Tensor dtype (default: as in the source).")


def main(argv):
    del argv
    from mmjax.weights.orbax_io import orbax_to_hf
    ckpt_dir, out_dir, dtype = (f.value for f in FLAGS)
    out = orbax_to_hf(ckpt_dir, out_dir, dtype=dtype)
    print(f"wrote {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["ckpt_dir", "out_dir"])
    app.run(main)
