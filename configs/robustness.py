"""The video-robustness benchmarks' corruption lists, run by the adapt job on a real
dataset (`configs/real.py`'s adapt stage), reported as they report them: mPC (accuracy
averaged over corruptions and severities) and rPC (mPC / clean accuracy), per method.

    --config configs/robustness.py:BENCHMARK   (--config.data.root=DIR)

BENCHMARK:
  mini_kinetics_c  Yi et al. 2021 (NeurIPS D&B): 13 corruptions x severities 1-5, on
                   Kinetics-400 (their Mini Kinetics is 200 of its classes; this preset
                   runs all 400). For scale, their X3D-M: clean 62.6, mPC 48.6, rPC 77.6.
  mini_ssv2_c      the same list on Something-Something v2.
  ucf101_c         ViTTA's (Lin et al. 2023) 12 corruptions at severity 5, on UCF101.

The codec corruptions and rain use the benchmarks' parameters (`dmd_jax.data.
host_corruptions`); the others are dmd_jax's device implementations (ImageNet-C's
parameters, `dmd_jax.data.corruptions`), not bit-identical to the benchmarks' files.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real  # noqa: E402

YI_ET_AL = ("shot_noise", "rain", "contrast", "brightness", "saturate", "motion_blur", "fog",
            "bit_error", "h265_crf", "h265_abr", "h264_crf", "h264_abr", "frame_rate")
VITTA_UCF101_C = ("gaussian_noise", "pepper", "salt", "shot_noise", "zoom_blur",
                  "impulse_noise", "defocus_blur", "motion_blur", "jpeg", "contrast", "rain",
                  "h265_abr")
BENCHMARKS = {
    # name: (dataset of configs/real.py, corruptions, severities)
    "mini_kinetics_c": ("kinetics400", YI_ET_AL, (1, 2, 3, 4, 5)),
    "mini_ssv2_c": ("ssv2", YI_ET_AL, (1, 2, 3, 4, 5)),
    "ucf101_c": ("ucf101", VITTA_UCF101_C, (5,)),
}


def get_config(arg: str = "ucf101_c"):
    if arg not in BENCHMARKS:
        raise ValueError(f"configs/robustness.py: unknown benchmark {arg!r}; use one of "
                         f"{sorted(BENCHMARKS)}")
    dataset, corruptions, severities = BENCHMARKS[arg]
    config = real.get_config(f"{dataset},adapt")
    config.adapt.update(corruptions=corruptions, severities=severities, protocol="reset")
    return config
