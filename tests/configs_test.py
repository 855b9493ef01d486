"""configs/: every variant holds exactly the sections its job reads, and configs/real.py's
every dataset x stage x cloud is a complete config for its job."""

import pytest

from conftest import REPO
from dmd_jax import config_utils, jobs
from dmd_jax.config_utils import flat_keys, load_config
from dmd_jax.jobs import pipeline as pipeline_job

REAL = f"{REPO}/configs/real.py"
DEMO = f"{REPO}/configs/demo.py"
DATASETS = ("ucf101", "hmdb51", "kinetics400", "ssv2", "folder")
STAGES = ("edge", "teacher", "label", "switcher", "hybrid", "adapt")


@pytest.mark.parametrize("variant", [f"{s}{t}" for s in (*STAGES, "adapt_long")
                                     for t in ("", ",tiny")])
def test_demo_variants_hold_exactly_their_jobs_sections(variant):
    config = load_config(f"{DEMO}:{variant}")
    job = jobs.module(config.job)
    config_utils.check_sections(config, config.job, job.SECTIONS, keys=job.KEYS)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_every_key_its_job_reads(dataset, stage):
    """The demo's stage configs are what the jobs' tests run: a real config that lacked one
    of their keys would fail hours into a run, so none may be missing."""
    real = load_config(f"{REAL}:{dataset},{stage}")
    demo = load_config(f"{DEMO}:{stage}")
    assert real.job == demo.job
    job = jobs.module(real.job)
    config_utils.check_sections(real, real.job, job.SECTIONS, keys=job.KEYS)
    # The synthetic dataset's own keys; fine-tuning takes the architecture from init_from.
    not_needed = ("data.split_sizes", "data.ceiling_cameras", "model.")
    missing = {k for k in set(flat_keys(demo)) - set(flat_keys(real))
               if not k.startswith(not_needed)}
    assert not missing
    if "data" in real:
        assert set(real.data.split_specs) == {"train", "unlabelled", "calibration", "test"}
        assert (real.data.frames, real.data.size) == ((13, 160) if stage == "edge" else (16, 224))
    if "train" in real:
        assert real.train.init_from and not real.model  # architecture from the checkpoint
        assert real.data.views.temporal * real.data.views.spatial == 15  # 5 windows x 3 crops
        assert real.data.views.sampling_rate == (6 if stage == "edge" else 4)
    if "data" in real:
        assert real.data.views.flip == (dataset != "ssv2")  # SSv2's labels say left or right


def test_pipeline_stages_get_their_clip_shape_and_models(tmp_path):
    config = load_config(f"{REAL}:ucf101,pipeline")
    assert config.stage_order == ("edge", "teacher", "label", "switcher", "hybrid", "adapt")
    edge = pipeline_job.stage_config(config, "edge", str(tmp_path))
    label = pipeline_job.stage_config(config, "label", str(tmp_path))
    assert (edge.data.frames, edge.data.size, edge.train.init_from) == (13, 160, "models/x3d_s")
    assert (label.data.frames, label.data.size) == (16, 224)
    assert label.cloud.path == f"{tmp_path}/teacher/model"
    assert edge.data.split_specs.unlabelled == "train[50%:90%]"
    switcher = pipeline_job.stage_config(config, "switcher", str(tmp_path))
    assert "data" not in switcher and "runtime" not in switcher  # not its sections


def test_zero_shot_cloud_has_no_teacher_stage(tmp_path):
    config = load_config(f"{REAL}:hmdb51,pipeline,xclip")
    assert "teacher" not in config.stage_order
    label = pipeline_job.stage_config(config, "label", str(tmp_path))
    assert label.cloud.path == "models/xclip_b32"
    with pytest.raises(ValueError, match="zero-shot"):
        load_config(f"{REAL}:hmdb51,teacher,xclip")


def test_bad_argument_names_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'ucf'.*ucf101"):
        load_config(f"{REAL}:ucf,edge")
    with pytest.raises(ValueError, match="DATASET,STAGE"):
        load_config(f"{REAL}:ucf101")


def test_a_misspelt_setting_in_a_config_file_is_refused(tmp_path):
    """Keys inside a section are checked too: a config file of one's own with a typo
    (which no override check sees) stops with the nearest key."""
    from conftest import tiny_config
    from dmd_jax.jobs import label, train

    config = tiny_config(str(tmp_path))
    config.train.learing_rate = 0.1
    with pytest.raises(config_utils.ConfigSectionError,
                       match="config.train.learing_rate.*did you mean learning_rate"):
        train.run(config, str(tmp_path / "run"))
    config = tiny_config(str(tmp_path), "label")
    del config.label.chunk_size
    with pytest.raises(config_utils.ConfigSectionError, match="config.label lacks chunk_size"):
        label.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_adapt_long_streams_a_split_of_its_own():
    config = load_config(f"{DEMO}:adapt_long")
    assert dict(config.data.split_sizes) == {"train": 2048, "stream": 8192}
    assert config.adapt.split == "stream" and len(config.adapt.seeds) >= 3
    assert 8192 // config.adapt.batch_size >= 128


def test_the_embedded_dataset_refuses_a_split_it_cannot_render():
    from dmd_jax.data import builders, synthetic

    with pytest.raises(ValueError, match=r"renders the splits .* not \['holdout'\]"):
        builders.SyntheticActionsConfig.create(synthetic.RenderConfig(), {"holdout": 8}, 0)


@pytest.mark.parametrize("benchmark", ["mini_kinetics_c", "mini_ssv2_c", "ucf101_c"])
def test_robustness_presets_run_the_benchmarks_lists(benchmark):
    from dmd_jax.data import corruptions

    config = load_config(f"{REPO}/configs/robustness.py:{benchmark}")
    job = jobs.module(config.job)
    config_utils.check_sections(config, config.job, job.SECTIONS, keys=job.KEYS)
    assert set(config.adapt.corruptions) <= set(corruptions.ALL_CORRUPTIONS)
    assert len(config.adapt.corruptions) == (12 if benchmark == "ucf101_c" else 13)
    assert tuple(config.adapt.severities) == ((5,) if benchmark == "ucf101_c" else (1, 2, 3, 4, 5))
    assert (config.data.views.temporal, config.data.views.spatial) == (1, 1)  # adapt: one view


TIERS = f"{REPO}/configs/tiers.py"


def test_tiers_variants_hold_exactly_their_jobs_sections():
    """configs/tiers.py: every stage a complete config of its job; each EDGE's stages read
    one label dir and one cloud, and the cascade's hops read what those stages write."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_tiers", TIERS)
    tiers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiers)
    for stage in tiers.STAGES:
        config = load_config(f"{TIERS}:{stage}")
        job = jobs.module(config.job)
        config_utils.check_sections(config, config.job, job.SECTIONS, keys=job.KEYS)
        if "cloud" in config:
            assert config.cloud.path == tiers.CLOUD
    cascade = load_config(f"{TIERS}:cascade:middle").cascade
    assert cascade.label_dirs == tuple(load_config(f"{TIERS}:switcher:{e}").switcher.label_dir
                                       for e in ("edge", "middle"))
    assert cascade.models[-1] == tiers.CLOUD
    assert load_config(f"{TIERS}:cloud").train.steps == 900
    with pytest.raises(ValueError, match="unknown stage"):
        load_config(f"{TIERS}:label:nope")


def test_cema_sweep_is_the_long_adapt_config_with_lam_variants():
    """configs/cema_sweep.py: adapt_long's sections, every method resolvable, and each
    `cema_lamN` CEMA with only its E_max scale changed, each random control with only
    its upload share."""
    from dmd_jax import tta
    config = load_config(f"{REPO}/configs/cema_sweep.py")
    job = jobs.module(config.job)
    config_utils.check_sections(config, config.job, job.SECTIONS, keys=job.KEYS)
    tta.check(config.adapt)
    assert config.adapt.split == "stream"
    _, paper = tta.method_settings(config.adapt, "cema")
    for lam in (0.3, 0.45, 0.9):
        implementation, settings = tta.method_settings(config.adapt, f"cema_lam{round(lam * 100)}")
        assert implementation == "cema" and settings == {**paper, "lam": lam}
    for name, share in (("cloud_random20", 0.2), ("cloud_random36", 0.36)):
        implementation, settings = tta.method_settings(config.adapt, name)
        assert implementation == "cema" and settings == {**paper, "random_upload": share}


def test_cema_controls_change_only_what_goes_up_and_the_cloud_steps():
    """configs/cema_controls.py: adapt_long's sections, three seeds, every method and
    difference resolvable, and each control CEMA with only its upload choice and its
    cloud steps changed."""
    from dmd_jax import tta
    config = load_config(f"{REPO}/configs/cema_controls.py")
    job = jobs.module(config.job)
    config_utils.check_sections(config, config.job, job.SECTIONS, keys=job.KEYS)
    tta.check(config.adapt)
    assert config.adapt.split == "stream" and tuple(config.adapt.seeds) == (0, 1, 2)
    _, paper = tta.method_settings(config.adapt, "cema")
    expected = {"cloud_random20": {"random_upload": 0.2},
                "cloud_random20_steps4": {"random_upload": 0.2, "min_cloud_steps": 4},
                "cloud_all_steps4": {"upload_all": True, "min_cloud_steps": 4}}
    for name, changed in expected.items():
        implementation, settings = tta.method_settings(config.adapt, name)
        assert implementation == "cema" and settings == {**paper, **changed}
    for spec in config.adapt.differences:  # none skipped for a method not run
        assert set(spec.split("-")) <= set(config.adapt.methods), spec
