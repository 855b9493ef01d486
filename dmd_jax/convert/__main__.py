"""`python -m dmd_jax.convert --family {x3d,videomae,xclip} --src PATH --out DIR [--frames N --size S]`.

Writes a model directory (`model.json` + orbax variables) that every job loads, e.g.
`--config.cloud.path=DIR`. See `dmd_jax.convert` for what is read and how.
"""

from __future__ import annotations

import argparse

from dmd_jax import config_utils
from dmd_jax import plugins
from dmd_jax.convert import FAMILY_EXPORTS, convert


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dmd_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True,
                        help="the checkpoint's family: "
                             f"{', '.join(plugins.available('dmd_jax.convert', FAMILY_EXPORTS))} "
                             "(or the dotted path of a converter module of yours)")
    parser.add_argument("--src", required=True,
                        help=".safetensors, .bin/.pt/.pth/.pyth, or a folder with config.json")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per clip the model sees (default: the checkpoint config's "
                             "num_frames, else 16)")
    parser.add_argument("--size", type=int, default=None,
                        help="clip height and width (default: its image_size, else 224)")
    parser.add_argument("--class-names", default="",
                        help="a text file with one class name per line (default: the "
                             "checkpoint's id2label, else class_0, class_1, ...); required "
                             "for xclip, whose zero-shot classes are these")
    args = parser.parse_args()
    names = None
    if args.class_names:
        with open(args.class_names) as f:
            names = tuple(line.strip() for line in f if line.strip())
    model = convert(args.family, args.src, args.out, args.frames, args.size, names)
    print(f"converted {args.src} -> {args.out}: {model.model_config.name}, "
          f"{len(model.class_names)} classes, input {model.input_shape}")


if __name__ == "__main__":
    config_utils.run_with_clear_errors(main)
