"""The demo: the embedded synthetic action dataset, sized for 2 CPU cores.

One stage at a time (each resumes if killed; the paths below are the defaults):

    python -m dmd_jax.main --config configs/demo.py:edge --workdir runs/demo/edge
    python -m dmd_jax.main --config configs/demo.py:teacher --workdir runs/demo/teacher
    python -m dmd_jax.main --config configs/demo.py:label --workdir runs/demo/label
    python -m dmd_jax.main --config configs/demo.py:switcher --workdir runs/demo/switcher
    python -m dmd_jax.main --config configs/demo.py:hybrid --workdir runs/demo/hybrid
    python -m dmd_jax.main --config configs/demo.py:adapt --workdir runs/demo/adapt

Variants (`file.py:STAGE[,tiny]`): `edge` (default) trains the tiny X3D edge; `teacher`
the ~12x larger X3D the hybrid system defers to (the cloud model); `label`, `switcher` and
`hybrid` run the DMD stages on their outputs; `adapt` adapts the edge under corrupted
video (CEMA, with the teacher as its cloud, and the baselines), `adapt_long` the same on
8,192-clip streams per corruption (the papers' regime); `pipeline` runs them all.
`,tiny` shrinks data and models to a seconds-long smoke run (`tiny` alone is `edge,tiny`).

Each variant holds only the sections its job reads (`dmd_jax.jobs.<job>.SECTIONS`), so a
setting another job would read (`--config.train.steps` on a label run) is refused as an
unknown key instead of being ignored.
"""

import ml_collections


def data_config(size: str = "demo") -> ml_collections.ConfigDict:
    """The embedded dataset; `size='tiny'` for tests.

    The deployment (the unlabelled pool, calibration and test) has a second kind of
    camera, ceiling cameras (upside down, flickering light; see `dmd_jax.data.synthetic`),
    which the edge's training clips (`train`) never show and the cloud's broader training
    data (`train` plus `broad`) does. The edge answers their clips confidently and often
    wrongly: what a switcher trained on the deployment's own unlabelled clips can learn
    and the edge's confidence cannot tell."""
    splits = {"train": 6144, "broad": 1024, "calibration": 1024, "test": 1024,
              "unlabelled": 4096}
    if size == "tiny":
        splits = {"train": 64, "broad": 16, "calibration": 32, "test": 32, "unlabelled": 32}
    return ml_collections.ConfigDict(dict(
        name="synthetic_actions",  # or 'video_folder' (data.root) or 'ucf101'
        data_dir="",  # '' -> tfds's default (~/tensorflow_datasets or $TFDS_DATA_DIR); gs://...
        cache_dir="",  # local mirror of a gs:// data_dir ('' -> ~/.cache/dmd_jax/datasets)
        prepare=True,  # generate the dataset when it is missing
        seed=0,
        frames=8,
        size=32,
        split_sizes=splits,
        # The fraction of each split's clips filmed by ceiling cameras (others: 0).
        ceiling_cameras=dict(broad=1.0, unlabelled=0.2, calibration=0.2, test=0.2),
        # The jobs' split names -> tfds split specs, for datasets published with other
        # splits (e.g. unlabelled='train[50%:90%]'); unset names are used as they are.
        split_specs={},
        # The views models see (dmd_jax.data.views): the embedded clips are short, so one
        # window of the whole clip; no flips (half the classes are left/right twins).
        views=dict(sampling_rate=0, train_scale=(1.0, 1.0), flip=False, temporal=1, spatial=1),
        workers=0,  # loader processes decoding batches (0: threads of the job's process)
    ))


# Model sizes: the edge is tiny (95k parameters); the teacher ~12x its parameters (1.18M).
# The teacher is wide and shallow: on 2 CPU cores a deeper X3D (width 1.0, depth 2.2,
# 694k) learned far more slowly per step and missed the demo budget (see issue 2 notes).
EDGE = dict(width_factor=0.5, depth_factor=1.0, head_dim=128)
TEACHER = dict(width_factor=2.0, depth_factor=1.0, head_dim=512)


def model_config(arch: dict) -> ml_collections.ConfigDict:
    """The architecture (`dmd_jax.models.x3d.Model`'s fields)."""
    return ml_collections.ConfigDict(dict(
        name="x3d", stem_dim_in=12, bottleneck_factor=2.25, se_ratio=0.0625,
        dropout_rate=0.2, **arch))


def runtime_config() -> ml_collections.ConfigDict:
    """How models run on this machine (never part of a saved model): compute dtype
    (float32 or bfloat16; parameters stay float32), X3D's depthwise convolution
    ('auto': 'shifted' on CPU, XLA's elsewhere) and the attention kernel ('auto', 'xla',
    'cudnn')."""
    return ml_collections.ConfigDict(dict(dtype="float32", depthwise_impl="auto",
                                          attention_impl="auto"))


STAGE_JOBS = {"edge": "train", "teacher": "train", "label": "label",
              "switcher": "train_switcher", "hybrid": "evaluate_hybrid", "adapt": "adapt",
              "adapt_long": "adapt", "serve": "serve", "link": "link", "export_edge": "export_edge",
              "pipeline": "pipeline"}
PIPELINE_STAGES = ("edge", "teacher", "label", "switcher", "hybrid", "adapt")
# The pipeline's adapt stage is a short look (~1 min on 2 CPU cores, one corruption); the
# full comparison (every method, all 15 corruptions) is `configs/demo.py:adapt`.
PIPELINE_ADAPT = dict(corruptions=("fog",), seeds=(0,),
                      methods=("source", "norm", "tent", "cema"))


def models_config(runs: str) -> ml_collections.ConfigDict:
    """The edge and the cloud: exported or converted model directories."""
    return ml_collections.ConfigDict(dict(edge=dict(path=f"{runs}/edge/model"),
                                          cloud=dict(path=f"{runs}/teacher/model")))


def dmd_config(runs: str) -> ml_collections.ConfigDict:
    """The DMD stages' sections: labelling, the switchers, the routers' evaluation."""
    return ml_collections.ConfigDict(dict(
        label=dict(
            splits=("unlabelled", "calibration", "test"),
            switcher_split="unlabelled",  # whose agreement rate summary.json reports
            batch_size=128,
            chunk_size=512,  # clips per file: the unit of resumption
            # The cloud also classifies each clip as decoded from H.264 at each of these CRFs
            # (what a deployed edge uploads); the hybrid job reports accuracy vs bytes.
            upload_crfs=(),
        ),
        switcher=dict(
            label_dir=f"{runs}/label",
            targets=("hard", "ground_truth"),  # the first is the DMD switcher; 'soft' also works
            train_split="unlabelled",
            eval_split="calibration",
            hidden=(128, 64),
            dropout_rate=0.1,
            steps=400,
            batch_size=256,
            learning_rate=3e-3,
            weight_decay=1e-4,
            class_balance=False,
            # The `relaxed` target's t (Hybrid LLM): 'balance' (their rule) or 'auc' (the
            # best calibration deferral AUC of `relaxation_candidates` probe switchers).
            relaxation="balance", relaxation_candidates=8,
            log_every=100,
            checkpoint_every=200,
        ),
        hybrid=dict(
            label_dir=f"{runs}/label",
            switcher_dir=f"{runs}/switcher",
            # Every router compared (`dmd_jax.routers`: NAME[:ARG] or a dotted module path):
            routers=dict(dmd_switcher="switcher:hard", gt_switcher="switcher:ground_truth",
                         max_prob="max_prob", entropy="entropy", margin="margin"),
            deploy="dmd_switcher",  # the router the operating point is calibrated for
            # Learned routers whose AUC is compared with max_prob's (paired bootstrap).
            compare_with_max_prob=("dmd_switcher", "gt_switcher"),
            calibration_split="calibration",
            test_split="test",
            # The operating point: the best calibration accuracy within this fraction of the
            # cloud alone's GFLOPs per clip, or within `gflops_budget` GFLOPs per clip if
            # > 0; with both 0, the offload rate `target_offload`.
            compute_budget=0.5,
            gflops_budget=0.0,
            target_offload=0.3,
            fusion=True,  # cloud-side fusion of cloud and edge log-probabilities
            # Resamples of the test clips for the 95% interval of each switcher's AUC
            # minus max_prob's (0: none).
            bootstrap_resamples=1000,
            # Thresholds bounding the deployed router's disagreement with the cloud among
            # the clips kept at the edge by alpha, with probability 1 - delta.
            guarantee_alphas=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
            guarantee_delta=0.1,
            # Test splits the label job saw corrupted ('test@fog@3', in label.splits): the
            # routers under shift, and the deployed threshold recalibrated on the first
            # `recalibration_window` clips' scores.
            shift_splits=(),
            recalibration_window=256,
        ),
    ))


def adapt_config(runs: str = "runs/demo") -> ml_collections.ConfigDict:
    """Online adaptation under corruptions (METHODS.md §2-4): the edge adapts, the teacher
    is CEMA's cloud foundation model. The defaults are the papers'; one section per method
    (`dmd_jax.tta`), variants as overrides of a method's section. `dmd` and `dmd_cema`
    offload through the switcher and operating point of the DMD stages under `runs`."""
    offloading = dict(switcher_dir=f"{runs}/switcher",
                      operating_point=f"{runs}/hybrid/operating_point.json")
    from dmd_jax.data.corruptions import METHODS_CORRUPTIONS

    gradient = dict(learning_rate=2.5e-4, momentum=0.9)  # Tent's, shared by EATA and SAR
    # EATA's redundancy margin, 0.05 for ImageNet's 1000 classes, is scaled to the dataset's
    # class count when the job runs (a confident clip's cosine to a uniform average is
    # 1/sqrt(C): 0.03 for 1000 classes but 0.29 for 12, where 0.05 rejects every clip
    # after the first upload): 0.05 * sqrt(1000 / C), rounded to 0.01 (0.46 for 12).
    redundancy = dict(redundancy_margin=0.05, margin_reference_classes=1000)
    return ml_collections.ConfigDict(dict(
        split="test",
        # 'reset' (per corruption x severity), 'continual', 'gradual' (severities up and
        # down per corruption), 'mixed' or 'correlated[:delta]' (class-ordered, Dirichlet)
        protocol="reset",
        corruptions=METHODS_CORRUPTIONS,
        severities=(5,),
        methods=("source", "norm", "tent", "eata", "sar", "lame", "vitta", "cema",
                 "cema_static_emax", "cloud_all"),  # any method or variant below
        batch_size=64,  # the stream batch (global)
        seeds=(0, 1, 2),  # each: the stream's order and the corruptions' noise
        collapse_fraction=0.9,  # an adapted batch this concentrated on one class resets
        log_every=0,  # progress every N batches within a stream (0: per stream only)
        checkpoint_every=32,  # batches between a stream's checkpoints (0: none)
        # Accuracy differences reported with paired bootstrap intervals over the clips.
        differences=("norm-source", "tent-norm", "eata-norm", "sar-norm", "lame-source",
                     "vitta-source", "cema-norm", "cema-cloud_all"),
        bootstrap_resamples=1000,
        tent=dict(gradient),
        eata=dict(
            **gradient,
            margin_factor=0.4,  # E0 = 0.4 ln C
            **redundancy,
            ema_decay=0.9,
            fisher_alpha=2000.0,
            fisher_split="train",  # clean clips for EATA's Fisher information
            fisher_clips=2000,
        ),
        # full_reset=False: a reset restores the parameters only (the authors' code).
        sar=dict(**gradient, margin_factor=0.4, sam_rho=0.05, reset_loss_ema=0.2,
                 full_reset=False),
        # The authors' defaults (and Döbler et al.'s benchmark's): Gaussian affinity of
        # width the mean distance to the 5th nearest clip, 100 bound steps.
        lame=dict(affinity="rbf", knn=5, bound_lambda=1.0, max_steps=100, force_symmetry=False),
        # The authors' defaults (wlin-at/ViTTA); `layers`: X3D's last two stages, as their
        # ResNet's layer3/layer4.
        vitta=dict(learning_rate=5e-5, momentum=0.9, weight_decay=5e-4, parameters="all",
                   layers=("stage3", "stage4"), stats_momentum=0.1, align_weight=1.0,
                   consistency_weight=0.1, views=2, min_frames_fraction=0.75,
                   min_crop_fraction=0.875, source_split="train", source_clips=2000),
        cema=dict(
            margin_factor=0.4,
            unreliable_filter=True,  # H < E_max(t)
            dynamic_emax=True,  # E_max(t) = E0 lam mean_H(t) / mean_H(warm-up) after warm-up
            warmup_clips=256,
            lam=0.6,
            low_info_filter=True,  # H > e_min ln C
            e_min=0.02,
            redundancy_filter=True,  # |cos(m, p)| < redundancy margin (EATA's)
            **redundancy,
            ema_decay=0.9,
            upload_all=False,  # cloud_all sets it
            # A share of the clips uploaded uniformly at random instead of filtered (0: off):
            # the control at matched upload (cloud_random20)
            random_upload=0.0,
            # BatchNorm with running statistics shared by cloud and edge (test-time batch
            # renormalisation, as the official code) instead of each batch's own:
            batch_renorm=False,
            # 0: clips go up as raw uint8; a CRF: as H.264 at that quality, and the cloud
            # learns from the decoded clips (what a deployed edge sends; bytes counted encoded)
            upload_crf=0,
            buffer_size=10000,
            new_per_step=32,
            replay_per_step=96,
            replay_from=256,
            # Replay-only steps fill each upload's steps up to this many (the authors' 1: a
            # replayed step when nothing new arrived); the cloud's compute, not the link's
            min_cloud_steps=1,
            foundation_learning_rate=2.5e-4,
            edge_learning_rate=2.5e-3,
            momentum=0.9,
            alpha=3.0,
            beta=3.0,
            gamma=1.0,
            temperature=1.0,
            # Batches between a cloud step and the edge using its parameters (0: the next
            # batch, as the paper's simulation; k: a link k batches late)
            download_delay=0,
        ),
        # DMD's offloading on the stream, nothing adapted (`batch_statistics`: the edge
        # normalised as `norm`); and one upload, two uses: DMD's offloads feed CEMA's cloud
        # (its settings are config.adapt.cema's, with these added).
        dmd=dict(**offloading, upload_crf=0, batch_statistics=False),
        # cloud_answers: 'model' (the cloud as trained) or 'adapted' (CEMA's foundation)
        dmd_cema=dict(**offloading, cloud_answers="adapted"),
        # Named variants: a method's section with some settings changed.
        variants=dict(
            cema_static_emax=dict(method="cema", dynamic_emax=False),  # the official code's
            cema_h264=dict(method="cema", upload_crf=28),  # uploads encoded
            cema_no_emin=dict(method="cema", low_info_filter=False),
            cema_no_redundancy=dict(method="cema", redundancy_filter=False),
            cloud_all=dict(method="cema", upload_all=True),  # the 100%-upload bound
            # A random 20% up: do CEMA's filters choose better than chance?
            cloud_random20=dict(method="cema", random_upload=0.2),
            cema_tbr=dict(method="cema", batch_renorm=True),  # as the official code
            cloud_all_tbr=dict(method="cema", upload_all=True, batch_renorm=True),
            dmd_norm=dict(method="dmd", batch_statistics=True),
            dmd_cema_static_cloud=dict(method="dmd_cema", cloud_answers="model"),
            # Every offloaded clip adapts (the filters off): the switcher's offloads are the
            # clips the edge doubts, which CEMA's reliability filter mostly turns away.
            dmd_cema_all=dict(method="dmd_cema", upload_all=True),
            # Stale parameters: the downloads reach the edge k batches late.
            cema_late1=dict(method="cema", download_delay=1),
            cema_late4=dict(method="cema", download_delay=4),
            cema_late16=dict(method="cema", download_delay=16),
        ),
    ))


def serve_config() -> ml_collections.ConfigDict:
    """The cloud server (`dmd_jax.serve.server.Settings`): where it listens, how it
    batches, when it refuses. `edge.path` '' serves classification only."""
    return ml_collections.ConfigDict(dict(
        host="127.0.0.1", port=50051, max_batch=32, max_wait_ms=5.0, queue_capacity=64,
        max_message_mb=64, workers=16, delay_ms=0.0))


def link_config(runs: str) -> ml_collections.ConfigDict:
    """The edge's side of the link (`dmd_jax.jobs.link`): where the cloud is, the
    deadline, the upload's encoding, the stream and the offload rates measured."""
    return ml_collections.ConfigDict(dict(
        address="",  # '' -> read from server_file (written by the serve job)
        server_file=f"{runs}/serve/server.json",
        deadline_s=1.0, crf=23, backoff_s=(0.05, 2.0),
        adapt_deadline_s=10.0,  # CEMA's uploads (`Adapt`): nothing waits for their answer
        split="test", corruption="fog", severity=3, batch_size=16, max_batches=32,
        offload_rates=(0.0, 0.25, 0.5, 1.0),
        # At the operating point: offloading alone, CEMA alone, and one upload for both
        # (the offloaded clips CEMA's filters keep also adapt the edge).
        methods=("dmd", "cema", "dmd_cema"),
        cloud_answers="adapted",  # dmd_cema's: the edge's adapted foundation, or 'model'
        # An export_edge artifact (normalization 'batch'): the CEMA edges (cema, dmd_cema)
        # then run it in ONNX Runtime instead of JAX; '' -> JAX.
        deployed_edge="",
        bandwidths_mbit=(10.0, 100.0), rtts_ms=(50.0, 10.0)))


def export_config() -> ml_collections.ConfigDict:
    """The deployed edge (`dmd_jax.jobs.export_edge`): how it normalises, its int8 form's
    calibration, and the check against JAX."""
    return ml_collections.ConfigDict(dict(
        normalization="batch",  # 'batch' (CEMA's edge, Norm, Tent) or 'running'
        int8=True, calibration_split="calibration", calibration_clips=256,
        check_split="test", check_clips=512, batch_size=16, tolerance=1e-4))


def get_config(arg: str = "edge") -> ml_collections.ConfigDict:
    stage, tiny = parse(arg)
    if stage == "pipeline":
        return pipeline_config(tiny)
    return stage_config(stage, tiny)


def parse(arg: str) -> tuple[str, bool]:
    """`STAGE[,tiny]` -> (stage, tiny); `tiny` alone is the tiny edge (a smoke run)."""
    if arg == "tiny":
        return "edge", True
    stage, _, size = arg.partition(",")
    if stage not in STAGE_JOBS or size not in ("", "tiny"):
        raise ValueError(f"configs/demo.py: unknown variant {arg!r}; use STAGE or STAGE,tiny "
                         f"with STAGE one of {list(STAGE_JOBS)}")
    return stage, size == "tiny"


def pipeline_config(tiny: bool) -> ml_collections.ConfigDict:
    """The whole experiment: one stage config per step, sharing `data`, `runtime`, `seed`
    and devices.

    Override a stage's setting with e.g. `--config.stages.teacher.train.steps=2000`; the
    pipeline points each stage at the previous stages' outputs under its workdir.
    """
    config = run_config("pipeline")
    config.data = data_config("tiny" if tiny else "demo")
    config.runtime = runtime_config()
    if tiny:
        shrink(config, "pipeline")
    config.stage_order = PIPELINE_STAGES  # a ConfigDict iterates its keys sorted
    config.stages = ml_collections.ConfigDict()
    for stage in PIPELINE_STAGES:
        stage_cfg = stage_config(stage, tiny)
        for shared in ("data", "runtime", "seed", "num_devices", "overwrite"):
            if shared in stage_cfg:
                del stage_cfg[shared]
        if stage == "adapt":
            stage_cfg.adapt.update(PIPELINE_ADAPT)
            if tiny:
                stage_cfg.adapt.update(corruptions=("gaussian_noise",), methods=("norm", "cema"))
        if stage == "label" and tiny:  # the smoke run also sends its offloads as H.264
            stage_cfg.label.upload_crfs = (30,)
        config.stages[stage] = stage_cfg
    return config


RUN_KEYS = ("job", "seed", "num_devices", "overwrite")


def run_config(job: str) -> ml_collections.ConfigDict:
    """The settings every job takes: which job, the seed, the devices, and whether results
    on disk made with other settings may be recomputed (`overwrite`; else the job stops
    and names what differs)."""
    return ml_collections.ConfigDict(dict(job=job, seed=0, num_devices=0, overwrite=False))


def stage_config(stage: str, tiny: bool = False) -> ml_collections.ConfigDict:
    """The config of one job, with exactly the sections it reads; `tiny` shrinks data and
    models."""
    job = STAGE_JOBS[stage]
    config = run_config(job)  # num_devices 0: every device of every host
    runs = "runs/demo"
    if job in ("train", "label", "adapt", "link", "export_edge"):
        config.data = data_config("tiny" if tiny else "demo")
    if job in ("label", "evaluate_hybrid", "adapt"):
        config.update(models_config(runs))
    if job in ("train", "label", "evaluate_hybrid", "adapt", "serve", "link", "export_edge"):
        config.runtime = runtime_config()
    dmd = dmd_config(runs)
    section = {"label": "label", "train_switcher": "switcher", "evaluate_hybrid": "hybrid"}
    if job in section:
        config[section[job]] = dmd[section[job]]
    if job == "adapt":
        config.adapt = adapt_config(runs)
    if job == "link":
        config.update(models_config(runs))
        config.edge.update(switcher_dir=f"{runs}/switcher",
                           operating_point=f"{runs}/hybrid/operating_point.json")
        config.link = link_config(runs)
        # The edge's side of CEMA (its filters); the cloud's side is the serve job's.
        from dmd_jax.tta import cema
        config.cema = {k: v for k, v in adapt_config(runs).cema.items()
                       if k in cema.LINK_EDGE_SETTINGS}
    if job == "export_edge":
        config.edge = dict(path=f"{runs}/edge/model", switcher_dir=f"{runs}/switcher",
                           operating_point=f"{runs}/hybrid/operating_point.json")
        config.export = export_config()
    if job == "serve":
        config.update(models_config(runs))
        config.serve = serve_config()
        config.cema = adapt_config(runs).cema
        del config.cema.download_delay  # a real link's delays are its own
    if stage == "adapt_long":
        long_streams(config)
    if job == "train":
        config.model = model_config(TEACHER if stage == "teacher" else EDGE)
        config.train = train_config(stage)
    if tiny:
        shrink(config, stage)
    return config


# `adapt_long`: streams as long as the papers' (ImageNet-C: ~780 batches per corruption):
# 8,192 clips per corruption (128 batches of 64), rendered as a split of their own with
# the deployment's camera mix, and 2,048 training clips for EATA's Fisher information.
LONG_STREAM = dict(split_sizes={"train": 2048, "stream": 8192},
                   ceiling_cameras={"stream": 0.2})


def long_streams(config: ml_collections.ConfigDict) -> None:
    """The adapt config on long streams (`configs/demo.py:adapt_long`)."""
    for key, value in LONG_STREAM.items():  # replaced, not merged into the demo's splits
        config.data[key] = ml_collections.ConfigDict(value)
    config.adapt.split = "stream"


def train_config(stage: str) -> ml_collections.ConfigDict:
    train = ml_collections.ConfigDict(dict(
        split="train",  # a split name or a tfds split spec ('train+broad')
        batch_size=32,  # global, over all devices and hosts
        steps=600,
        optimizer="adamw",  # 'adamw' or 'sgd'
        learning_rate=3e-3,
        warmup_steps=60,
        # Warm-up, constant, then a cosine over the last 20% ('wsd'; or 'cosine'
        # throughout): in 600 steps the edge reached 88.6% under 'wsd', 70.7% under
        # 'cosine' (the renderer's version 6, 2 CPU cores, 2026-11-21).
        schedule="wsd",
        decay_fraction=0.2,
        weight_decay=1e-4,
        momentum=0.9,  # sgd only
        label_smoothing=0.0,
        log_every=50,
        eval_every=300,
        eval_split="test",
        eval_batch_size=128,
        checkpoint_every=200,
        keep_checkpoints=2,
        init_from="",  # a model directory (exported or converted) to fine-tune from
    ))
    if stage == "teacher":
        # ~12x the edge's parameters and 4x its width: a third of its learning rate (at
        # the edge's 3e-3 the teacher reached 83.7% in 600 steps, at 1e-3 94.2%, on the
        # renderer's version 6).
        train.update(steps=600, eval_every=600, learning_rate=1e-3, decay_fraction=0.3)
        # The cloud model has seen more of the world than the edge: ceiling cameras too
        # (1,024 of its 7,168 clips; with 2,048 it had not learnt the order of frames in
        # 600 steps: 77.3% on test against 87.5%).
        train.split = "train+broad"
    return train


def shrink(config: ml_collections.ConfigDict, stage: str) -> None:
    """Tiny data and models for tests and smoke runs (each section the config has)."""
    if "model" in config:
        # One block per stage (depth 0.2 of X3D's 1, 2, 5, 3): the suite is bound by compile
        # time, which grows with the blocks (the tiny pipeline: 54 s against 75 s at depth
        # 0.5, 2-core CPU). lax.conv depthwise: half the compile time of "shifted", which
        # only pays off over many steps (both are tested equal).
        config.model.update(width_factor=0.5 if stage == "teacher" else 0.25, depth_factor=0.2,
                            head_dim=32)
    if "runtime" in config:
        config.runtime.depthwise_impl = "xla"
    if "train" in config:
        config.train.update(steps=6, log_every=2, eval_every=3, checkpoint_every=3,
                            batch_size=8, eval_batch_size=16, warmup_steps=1)
    if "label" in config:
        config.label.update(batch_size=8, chunk_size=16)
    if "hybrid" in config:
        # Tiny models cost about the same (the edge alone is over half the cloud): a fixed
        # offload rate instead of a compute budget.
        config.hybrid.compute_budget = 0.0
    if "switcher" in config:
        config.switcher.update(steps=20, batch_size=16, log_every=10, checkpoint_every=10)
    if "cema" in config:  # the serve job's CEMA cloud, the link's CEMA edge
        small = dict(warmup_clips=8, new_per_step=8, replay_per_step=8, replay_from=16,
                     buffer_size=64)
        config.cema.update({k: v for k, v in small.items() if k in config.cema})
    if "serve" in config:
        config.serve.max_batch = 8
    if "export" in config:
        config.export.update(calibration_clips=16, check_clips=16, batch_size=8)
    if "link" in config:
        config.link.update(batch_size=8, max_batches=4, offload_rates=(0.0, 0.5, 1.0),
                           deadline_s=30.0, adapt_deadline_s=30.0)
    if "adapt" in config:
        config.adapt.update(batch_size=8, corruptions=("gaussian_noise", "reverse"), seeds=(0,),
                            bootstrap_resamples=100)
        config.adapt.eata.fisher_clips = 16
        config.adapt.vitta.source_clips = 16
        config.adapt.cema.update(warmup_clips=8, new_per_step=8, replay_per_step=8,
                                 replay_from=16, buffer_size=64)
