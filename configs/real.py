"""Real experiments: UCF101, HMDB51, Kinetics-400, Something-Something v2 or any folder of
videos, an X3D-S edge and a VideoMAE-B or X-CLIP cloud.

    --config configs/real.py:DATASET,STAGE[,CLOUD][,tiny]

DATASET: ucf101 | hmdb51 | kinetics400 | ssv2, read as published with their official
split files from `--config.data.root=DIR`, the folder they unpacked to (the layouts:
`dmd_jax/data/sources/<dataset>.py`) | folder: any `DIR/<split>/<class>/<video>` tree
with train/ and test/ splits.
STAGE: edge | teacher | label | switcher | hybrid | adapt | pipeline.
CLOUD: videomae (default: VideoMAE-B from Kinetics-400, fine-tuned on DATASET by the
`teacher` stage) | xclip (X-CLIP B/32 zero-shot over DATASET's class names: no training;
the `teacher` stage is then skipped by the pipeline).
`tiny`: a minute-long smoke run of the stages on the same folder (tiny X3Ds trained from
scratch, 4x24x24 clips, a few steps): proof that a folder works end to end.

Folder videos stay encoded on disk and are decoded on the fly (`data.workers` processes).
Training sees PySlowFast's views: a random window of `frames x sampling_rate` frames
(X3D-S 13x6, VideoMAE 16x4), the short side jittered over [8/7, 10/7] x the crop, a random
crop and a horizontal flip (never on Something-Something, whose labels say left or
right). The edge and teacher stages evaluate on 5 windows x 3 crops, averaged; the
deployed stages (label, hybrid, adapt) on one view per clip, what an edge computes per
clip (`--config.data.views.temporal=10 --config.data.views.spatial=3` gives the papers'
30 views; the hybrid counts their GFLOPs).

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
    "ucf101": (dict(name="ucf101"), {**HALVES, "test": "test"}, 101),
    "hmdb51": (dict(name="hmdb51"), {**HALVES, "test": "test"}, 51),
    "kinetics400": (dict(name="kinetics400"), {"train": "train[:80%]",
                                                 "unlabelled": "train[80%:98%]",
                                                 "calibration": "train[98%:]",
                                                 "test": "validation"}, 400),
    "folder": (dict(name="video_folder"), {**HALVES, "test": "test"}, None),
    "ssv2": (dict(name="ssv2"), {"train": "train[:60%]", "unlabelled": "train[60%:95%]",
                                         "calibration": "train[95%:]", "test": "validation"}, 174),
}
CLOUDS = ("videomae", "xclip")
# (frames, size, sampling rate): X3D-S; VideoMAE-B (X-CLIP B/32 uses 8 of the 16 frames)
EDGE_CLIP, CLOUD_CLIP, TINY_CLIP = (13, 160, 6), (16, 224, 4), (4, 24, 2)
TRAIN_SCALE = (8 / 7, 10 / 7)  # PySlowFast's short-side jitter, 256..320 for a 224 crop
TRAINED_EVAL_VIEWS = dict(temporal=5, spatial=3)  # the edge and teacher stages' evaluation
FLIP_UNSAFE = ("ssv2",)  # labels that name a direction ("... from left to right")
STAGES = demo.PIPELINE_STAGES


def get_config(arg: str = "ucf101,edge") -> ml_collections.ConfigDict:
    dataset, stage, cloud, tiny = parse(arg)
    if stage == "pipeline":
        return pipeline_config(dataset, cloud, tiny)
    return stage_config(dataset, stage, cloud, tiny)


def parse(arg: str) -> tuple[str, str, str, bool]:
    parts = arg.split(",")
    tiny = parts[-1] == "tiny"
    parts = parts[:-1] if tiny else parts
    if len(parts) not in (2, 3):
        raise ValueError(f"configs/real.py: expected 'DATASET,STAGE[,CLOUD][,tiny]', got {arg!r}")
    dataset, stage, cloud = (*parts, "videomae")[:3]
    for value, allowed, what in ((dataset, DATASETS, "dataset"),
                                 (stage, (*STAGES, "pipeline"), "stage"),
                                 (cloud, CLOUDS, "cloud")):
        if value not in allowed:
            raise ValueError(f"configs/real.py: unknown {what} {value!r}; use one of "
                             f"{list(allowed)}")
    return dataset, stage, cloud, tiny


def data_config(dataset: str, tiny: bool = False) -> ml_collections.ConfigDict:
    overrides, specs, _ = DATASETS[dataset]
    data = demo.data_config()
    data.update({**pipeline.dataset_defaults(overrides["name"]), **overrides})
    frames, size, rate = TINY_CLIP if tiny else CLOUD_CLIP
    data.update(frames=frames, size=size, prepare=True, split_specs=specs)
    data.views.update(sampling_rate=rate, train_scale=TRAIN_SCALE,
                      flip=dataset not in FLIP_UNSAFE, temporal=1, spatial=1)
    data.workers = 0 if tiny else 8
    del data.split_sizes, data.ceiling_cameras  # the synthetic dataset's only
    return data


def _clip(config: ml_collections.ConfigDict, clip: tuple[int, int, int]) -> None:
    frames, size, rate = clip
    config.data.update(frames=frames, size=size)
    config.data.views.sampling_rate = rate


def stage_config(dataset: str, stage: str, cloud: str,
                 tiny: bool = False) -> ml_collections.ConfigDict:
    """demo.py's stage structure with this dataset, its models and schedules."""
    runs = f"runs/{dataset}"
    config = demo.stage_config(stage)
    if "data" in config:
        config.data = data_config(dataset, tiny)
    if "edge" in config:
        config.edge.path = f"{runs}/edge/model"
        config.cloud.path = f"{runs}/teacher/model" if cloud == "videomae" else "models/xclip_b32"
    if "train" in config:
        # The architecture comes from the pretrained model (train.init_from).
        config.model = ml_collections.ConfigDict()
        config.train.update(split="train", batch_size=32, eval_batch_size=64,
                            eval_split="calibration", schedule="cosine",
                            log_every=50, eval_every=1000, checkpoint_every=500)
        config.data.views.update(TRAINED_EVAL_VIEWS)
    if stage == "edge":  # fine-tune X3D-S from Kinetics-400 at its own clip shape
        _clip(config, EDGE_CLIP)
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
        # The offloads' bytes as a deployed edge sends them (H.264 at CRF 23), next to raw:
        # one more cloud pass over the label splits.
        config.label.update(batch_size=64, chunk_size=1024, upload_crfs=(23,))
    if "switcher" in config:
        config.switcher.update(steps=2000, log_every=200, checkpoint_every=500)
    if "adapt" in config:
        config.adapt.update(batch_size=64)
        config.adapt.eata.fisher_clips = 2000
        config.adapt.vitta.source_clips = 2000
    # EATA's redundancy margin is scaled to the dataset's class count when adapt runs.
    if tiny:
        _tiny(config, stage)
    return config


def _tiny(config: ml_collections.ConfigDict, stage: str) -> None:
    """demo.py's tiny sizes; models trained from scratch (no converted checkpoint)."""
    if "train" in config:
        config.model = demo.model_config(demo.TEACHER if stage == "teacher" else demo.EDGE)
        config.train.update(init_from="", optimizer="adamw", learning_rate=3e-3)
        _clip(config, TINY_CLIP)
    if stage in ("edge", "teacher", "label"):  # the multi-view paths, cheaply
        config.data.views.update(temporal=2, spatial=3)
    demo.shrink(config, stage)
    if "switcher" in config:
        config.switcher.batch_size = 8
    if "adapt" in config:
        config.adapt.update(methods=("source", "cema"), corruptions=("h264_crf",))  # on the host


def pipeline_config(dataset: str, cloud: str, tiny: bool = False) -> ml_collections.ConfigDict:
    """edge -> [teacher] -> label -> switcher -> hybrid -> adapt, one workdir
    (`--workdir runs/DATASET`); each stage as its own variant above."""
    config = demo.run_config("pipeline")
    config.data = data_config(dataset, tiny)
    config.runtime = demo.runtime_config()
    if tiny:  # the stages' own (shrunk) runtimes give way to this shared one
        demo.shrink(config, "pipeline")
    config.stage_order = tuple(s for s in STAGES if not (s == "teacher" and cloud == "xclip"))
    config.stages = ml_collections.ConfigDict()
    for stage in config.stage_order:
        stage_cfg = stage_config(dataset, stage, cloud, tiny)
        for shared in ("runtime", "seed", "num_devices", "overwrite"):
            if shared in stage_cfg:
                del stage_cfg[shared]
        if "data" in stage_cfg:  # only a stage's own clip and views differ from the shared data
            own = {k: stage_cfg.data[k] for k in ("frames", "size", "views")
                   if stage_cfg.data[k] != config.data[k]}
            del stage_cfg["data"]
            if own:
                stage_cfg.data = ml_collections.ConfigDict(own)
        config.stages[stage] = stage_cfg
    return config
