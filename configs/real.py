"""Real experiments: UCF101 (tfds), HMDB51 / Kinetics-400 / Something-Something v2
(folders of videos), an X3D-S edge and a VideoMAE-B or X-CLIP cloud.

    --config configs/real.py:DATASET,STAGE[,CLOUD]

DATASET: ucf101 | hmdb51 | kinetics400 | ssv2 (the folder datasets need
`--config.data.root=DIR`, laid out `DIR/<split>/<class>/<video>`).
STAGE: edge | teacher | label | switcher | hybrid | adapt | pipeline.
CLOUD: videomae (default: VideoMAE-B from Kinetics-400, fine-tuned on DATASET by the
`teacher` stage) | xclip (X-CLIP B/32 zero-shot over DATASET's class names: no training;
the `teacher` stage is then skipped by the pipeline).

Models come from converted PyTorch checkpoints under `models/` (README, "Real
experiments", has the download and conversion commands): `models/x3d_s` (pytorchvideo
X3D-S, Kinetics-400), `models/videomae_b`, `models/xclip_b32`. Runs go to
`runs/DATASET/<stage>`. The edge sees 13x160x160 clips (X3D-S), the cloud and every later
stage 16x224x224; each model resamples the clips it is given to its own input shape.

Datasets published with train/test only get the jobs' four splits as tfds slices
(`data.split_specs`): the edge trains on half of train, the switcher's unlabelled pool is
the next 40%, calibration the last 10%, and test is the published test split.
"""

import os
import sys

import ml_collections

from dmd_jax.data import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  (the stage structure and the papers' settings live there)

HALVES = {"train": "train[:50%]", "unlabelled": "train[50%:90%]", "calibration": "train[90%:]"}
DATASETS = {
    # name: (config.data overrides, split_specs, number of classes)
    "ucf101": (dict(name="ucf101", tfds_config="ucf101_1_256"), {**HALVES, "test": "test"}, 101),
    "hmdb51": (dict(name="video_folder"), {**HALVES, "test": "test"}, 51),
    "kinetics400": (dict(name="video_folder"), {"train": "train[:80%]",
                                                 "unlabelled": "train[80%:98%]",
                                                 "calibration": "train[98%:]",
                                                 "test": "validation"}, 400),
    "ssv2": (dict(name="video_folder"), {"train": "train[:60%]", "unlabelled": "train[60%:95%]",
                                         "calibration": "train[95%:]", "test": "validation"}, 174),
}
CLOUDS = ("videomae", "xclip")
EDGE_CLIP, CLOUD_CLIP = (13, 160), (16, 224)  # X3D-S; VideoMAE-B (X-CLIP B/32 uses 8 of 16)
STAGES = demo.PIPELINE_STAGES


def get_config(arg: str = "ucf101,edge") -> ml_collections.ConfigDict:
    dataset, stage, cloud = parse(arg)
    if stage == "pipeline":
        return pipeline_config(dataset, cloud)
    return stage_config(dataset, stage, cloud)


def parse(arg: str) -> tuple[str, str, str]:
    parts = arg.split(",")
    if len(parts) not in (2, 3):
        raise ValueError(f"configs/real.py: expected 'DATASET,STAGE[,CLOUD]', got {arg!r}")
    dataset, stage, cloud = (*parts, "videomae")[:3]
    for value, allowed, what in ((dataset, DATASETS, "dataset"),
                                 (stage, (*STAGES, "pipeline"), "stage"),
                                 (cloud, CLOUDS, "cloud")):
        if value not in allowed:
            raise ValueError(f"configs/real.py: unknown {what} {value!r}; use one of "
                             f"{list(allowed)}")
    return dataset, stage, cloud


def data_config(dataset: str) -> ml_collections.ConfigDict:
    overrides, specs, _ = DATASETS[dataset]
    data = demo.data_config()
    data.update({**pipeline.DATASET_DEFAULTS[overrides["name"]], **overrides})
    data.update(frames=CLOUD_CLIP[0], size=CLOUD_CLIP[1], prepare=True, split_specs=specs)
    del data.split_sizes, data.ceiling_cameras  # the synthetic dataset's only
    return data


def stage_config(dataset: str, stage: str, cloud: str) -> ml_collections.ConfigDict:
    """demo.py's stage structure with this dataset, its models and schedules."""
    runs = f"runs/{dataset}"
    config = demo.stage_config(stage)
    if "data" in config:
        config.data = data_config(dataset)
    if "edge" in config:
        config.edge.path = f"{runs}/edge/model"
        config.cloud.path = f"{runs}/teacher/model" if cloud == "videomae" else "models/xclip_b32"
    if "train" in config:
        # The architecture comes from the pretrained model (train.init_from).
        config.model = ml_collections.ConfigDict()
        config.train.update(split="train", batch_size=32, eval_batch_size=64,
                            eval_split="calibration", schedule="cosine",
                            log_every=50, eval_every=1000, checkpoint_every=500)
    if stage == "edge":  # fine-tune X3D-S from Kinetics-400 at its own clip shape
        config.data.update(frames=EDGE_CLIP[0], size=EDGE_CLIP[1])
        config.train.update(init_from="models/x3d_s", optimizer="sgd", learning_rate=0.01,
                            momentum=0.9, weight_decay=5e-5, warmup_steps=200, steps=4000)
    elif stage == "teacher":  # fine-tune VideoMAE-B from Kinetics-400
        if cloud == "xclip":
            raise ValueError("configs/real.py: the xclip cloud is zero-shot and has no teacher "
                             "stage; run label with '…,label,xclip'")
        config.train.update(init_from="models/videomae_b", optimizer="adamw",
                            learning_rate=5e-5, weight_decay=0.05, warmup_steps=200,
                            steps=3000, batch_size=16, eval_batch_size=32)
    if "label" in config:
        config.label.update(batch_size=64, chunk_size=1024)
    if "switcher" in config:
        config.switcher.update(steps=2000, log_every=200, checkpoint_every=500)
    if "adapt" in config:
        config.adapt.update(batch_size=64)
        config.adapt.eata.fisher_clips = 2000
        config.adapt.vitta.source_clips = 2000
    # EATA's redundancy margin is scaled to the dataset's class count when adapt runs.
    return config


def pipeline_config(dataset: str, cloud: str) -> ml_collections.ConfigDict:
    """edge -> [teacher] -> label -> switcher -> hybrid -> adapt, one workdir
    (`--workdir runs/DATASET`); each stage as its own variant above."""
    config = demo.run_config("pipeline")
    config.data = data_config(dataset)
    config.runtime = demo.runtime_config()
    config.stage_order = tuple(s for s in STAGES if not (s == "teacher" and cloud == "xclip"))
    config.stages = ml_collections.ConfigDict()
    for stage in config.stage_order:
        stage_cfg = stage_config(dataset, stage, cloud)
        for shared in ("runtime", "seed", "num_devices", "overwrite"):
            if shared in stage_cfg:
                del stage_cfg[shared]
        if "data" in stage_cfg:  # only a stage's own clip shape differs from the shared data
            own = {k: stage_cfg.data[k] for k in ("frames", "size")
                   if stage_cfg.data[k] != config.data[k]}
            del stage_cfg["data"]
            if own:
                stage_cfg.data = ml_collections.ConfigDict(own)
        config.stages[stage] = stage_cfg
    return config
