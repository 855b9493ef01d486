"""Do CEMA's upload filters choose better than chance, and what does the cloud's compute buy?

Runs after `make demo` (the demo's dataset, edge and teacher):

    python -m dmd_jax.main --config configs/cema_controls.py --workdir runs/demo/cema_controls

`configs/demo.py:adapt_long` (fog at severity 5, 8,192 clips), three seeds: CEMA and CEMA
without its redundancy filter against the controls at matched upload (a uniformly random
20% or 36% of the clips up, 36% being about what CEMA's filters send here;
`random_upload`), the random 20% with more cloud steps per upload (`min_cloud_steps`:
replayed steps fill each upload's up to 2 or 4; the link carries no more), and `cloud_all`
(every clip up) with and without 4 steps per upload. `configs/cema_sweep.py` is the sweep
over CEMA's E_max scale.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  (the demo's stages, sections and settings)

VARIANTS = {
    "cloud_random36": dict(random_upload=0.36),
    "cloud_random20_steps2": dict(random_upload=0.2, min_cloud_steps=2),
    "cloud_random20_steps4": dict(random_upload=0.2, min_cloud_steps=4),
    "cloud_all_steps4": dict(upload_all=True, min_cloud_steps=4),
}


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config("adapt_long")
    adapt = config.adapt
    for name, settings in VARIANTS.items():
        adapt.variants[name] = dict(method="cema", **settings)
    adapt.corruptions = ("fog",)
    adapt.seeds = (0, 1, 2)
    adapt.methods = ("norm", "cema", "cema_no_redundancy", "cloud_random20", *VARIANTS,
                     "cloud_all")
    adapt.differences = ("cema-cloud_all", "cema_no_redundancy-cema", "cema-cloud_random36",
                         "cloud_random20-cloud_all", "cloud_random36-cloud_all",
                         "cloud_random20_steps2-cloud_all", "cloud_random20_steps4-cloud_all",
                         "cloud_random20_steps4-cloud_all_steps4", "cema-norm")
    return config
