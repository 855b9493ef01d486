"""CEMA's accuracy against its upload, on the long streams (issue 17's acceptance).

Runs after `make demo` (the demo's dataset, edge and teacher):

    python -m dmd_jax.main --config configs/cema_sweep.py --workdir runs/demo/cema_sweep

`configs/demo.py:adapt_long` (fog at severity 5, 8,192 clips, seed 0) with CEMA at
several scales `lam` of its dynamic reliability bound E_max(t) = E0 lam mean_H(t) /
mean_H(warm-up) (the paper's 0.6; lower uploads fewer clips, higher more), CEMA without
its redundancy filter, the controls at matched upload (a uniformly random 20% or 36% of
the clips up, 36% being what CEMA's filters send here; `random_upload`) and `cloud_all`
(every clip up): does any setting come within a point of `cloud_all` at <= 20% upload,
and do the filters choose better than chance? Other corruptions or seeds: the usual
overrides, `--config.adapt.corruptions="('contrast',)" --config.adapt.seeds="(0,1,2)"`.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  (the demo's stages, sections and settings)

LAMS = (0.3, 0.45, 0.9)  # besides the paper's 0.6 (`cema`)


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config("adapt_long")
    adapt = config.adapt
    for lam in LAMS:  # variant names are config keys: no dots
        adapt.variants[f"cema_lam{round(lam * 100)}"] = dict(method="cema", lam=lam)
    adapt.variants.cloud_random36 = dict(method="cema", random_upload=0.36)
    adapt.corruptions = ("fog",)
    adapt.seeds = (0,)
    adapt.methods = ("norm", "cema", *(f"cema_lam{round(lam * 100)}" for lam in LAMS),
                     "cema_no_redundancy", "cloud_random20", "cloud_random36", "cloud_all")
    adapt.differences = tuple(f"{m}-cloud_all" for m in adapt.methods if m != "cloud_all")
    return config
