"""X-CLIP: converted zero-shot classifier == transformers' XCLIPModel.logits_per_video."""

import json
import string

import jax
import numpy as np
import pytest

from dmd_jax import convert, model_store, models, text
from dmd_jax.convert import mapping
from dmd_jax.models import xclip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CLASSES = ("move_right", "grow", "rotate_cw")


def _tiny_clip_tokenizer(directory) -> "transformers.CLIPTokenizer":
    """A character-level CLIP BPE vocabulary (end-of-text has the largest id, as in CLIP)."""
    chars = sorted(set(string.ascii_lowercase + "."))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(vocab=str(directory / "vocab.json"),
                                           merges=str(directory / "merges.txt"))
    tokenizer.save_pretrained(directory)  # writes tokenizer.json, what dmd_jax reads
    return tokenizer


def _reference(frames, image_size, patch_size, seed=0, text_extra=None, vision_extra=None,
               **extra):
    torch.manual_seed(seed)
    config = transformers.XCLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                         **(text_extra or {})),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                           num_frames=frames, mit_hidden_size=24, mit_intermediate_size=48,
                           mit_num_hidden_layers=1, mit_num_attention_heads=2,
                           **(vision_extra or {})),
        projection_dim=24, prompt_layers=2, prompt_num_attention_heads=2, **extra)
    model = transformers.XCLIPModel(config).eval()
    with torch.no_grad():  # unit-scale weights: small initialisations hide errors
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("frames,image_size,patch_size,extra", [
    (4, 32, 8, {}),
    (3, 24, 12, {}),
    # Every tower's own epsilon and activation (the converter once used the vision tower's
    # epsilon everywhere and quick GELU in the prompt generator: off by 2e-2 and 9e-3).
    (4, 32, 8, dict(text_extra=dict(layer_norm_eps=1e-2, hidden_act="gelu"),
                    vision_extra=dict(layer_norm_eps=3e-3), prompt_hidden_act="gelu")),
])
def test_zero_shot_logits_match_logits_per_video(tmp_path, frames, image_size, patch_size, extra):
    reference = _reference(frames, image_size, patch_size, **extra)
    reference.save_pretrained(tmp_path)
    tokenizer = _tiny_clip_tokenizer(tmp_path)
    model = convert.convert("xclip", str(tmp_path), str(tmp_path / "flax"), class_names=CLASSES)
    assert model.class_names == CLASSES
    assert model.input_shape == (frames, image_size, image_size, 3)

    prompts = text.prompts(CLASSES, model.model_config.prompt_template)
    ids = text.tokenize(text.load_tokenizer(str(tmp_path)), prompts, 40)
    expected_ids = tokenizer(prompts, padding="max_length", max_length=40).input_ids
    np.testing.assert_array_equal(ids, expected_ids)  # the same tokens as transformers

    x = np.random.default_rng(0).normal(size=(2, frames, 3, image_size, image_size))
    x = x.astype(np.float32)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids.astype(np.int64)),
                             pixel_values=torch.from_numpy(x)).logits_per_video.numpy()
    logits, _ = jax.jit(model.logits_and_features)(model.variables,
                                                   np.transpose(x, (0, 1, 3, 4, 2)))
    assert np.std(expected) > 0.05
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4


@pytest.mark.parametrize("where,field,value", [
    ("vision_config", "hidden_act", "silu"),  # an activation the towers do not implement
    ("", "prompt_hidden_act", "silu"),
    ("text_config", "use_rotary", True),  # a field the converter does not know
    ("vision_config", "image_size", [32, 24]),  # non-square frames
])
def test_config_fields_it_cannot_honour_are_refused_by_name(tmp_path, where, field, value):
    _reference(4, 32, 8).save_pretrained(tmp_path)
    _tiny_clip_tokenizer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (config[where] if where else config)[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mapping.ConversionError, match=field):
        convert.convert("xclip", str(tmp_path), str(tmp_path / "flax"), class_names=CLASSES)
    assert not (tmp_path / "flax" / "model.json").exists()


def test_zero_shot_needs_class_names(tmp_path):
    _reference(4, 32, 8).save_pretrained(tmp_path)
    with pytest.raises(mapping.ConversionError, match="--class-names"):
        convert.convert("xclip", str(tmp_path), str(tmp_path / "flax"))


def test_missing_tokenizer_is_named(tmp_path):
    _reference(4, 32, 8).save_pretrained(tmp_path)
    with pytest.raises(text.TokenizerNotFoundError, match="tokenizer.json"):
        convert.convert("xclip", str(tmp_path), str(tmp_path / "flax"), class_names=CLASSES)


def test_long_prompts_keep_their_end_of_text_token(tmp_path):
    _tiny_clip_tokenizer(tmp_path)
    ids = text.tokenize(text.load_tokenizer(str(tmp_path)), ["a" * 100, "b"], 16)
    eot = max(json.loads((tmp_path / "vocab.json").read_text()).values())
    assert ids.shape == (2, 16) and ids[0, -1] == eot and np.argmax(ids[1]) == 2


def test_inputs_are_normalised_with_the_checkpoints_statistics(tmp_path):
    _reference(4, 32, 8).save_pretrained(tmp_path)
    _tiny_clip_tokenizer(tmp_path)
    model = convert.convert("xclip", str(tmp_path), str(tmp_path / "clip"), class_names=CLASSES)
    assert models.input_stats(model.model_config) == xclip.INPUT_STATS  # CLIP
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    model = convert.convert("xclip", str(tmp_path), str(tmp_path / "own"), class_names=CLASSES)
    assert tuple(model.model_config.input_mean) == (0.5, 0.4, 0.3)
    clips = np.random.default_rng(1).integers(0, 256, (1, 4, 32, 32, 3), dtype=np.uint8)
    manual = (clips / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(jax.jit(model.apply)(model.variables, clips)[0],
                               jax.jit(model.logits_and_features)(model.variables,
                                                                  manual.astype(np.float32))[0],
                               rtol=1e-5, atol=1e-5)


def test_new_class_names_equal_a_fresh_conversion(tmp_path):
    _reference(4, 32, 8).save_pretrained(tmp_path)
    _tiny_clip_tokenizer(tmp_path)
    first = convert.convert("xclip", str(tmp_path), str(tmp_path / "a"), class_names=CLASSES)
    other = ("shrink", "move_left")
    renamed = model_store.load(str(tmp_path / "a"), class_names=other)  # re-prompted
    assert first.class_names == CLASSES
    fresh = convert.convert("xclip", str(tmp_path), str(tmp_path / "b"), class_names=other)
    clips = np.random.default_rng(2).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(jax.jit(renamed.apply)(renamed.variables, clips)[0],
                               jax.jit(fresh.apply)(fresh.variables, clips)[0],
                               rtol=1e-5, atol=1e-5)
    assert renamed.class_names == other


def test_label_job_with_a_zero_shot_cloud(tmp_path, data_dir, tiny_pipeline):
    """X-CLIP as the cloud: prompted with the dataset's class names, no training. The edge
    takes another clip shape than the cloud (4x24x24 vs 8x32x32, as an X3D-S edge at 13x160
    next to a 16x224 cloud): each model sees the dataset's clips resampled to its own."""
    from conftest import tiny_config
    from dmd_jax.data import labels, pipeline
    from dmd_jax.jobs import label

    _reference(8, 32, 8).save_pretrained(tmp_path)  # the tiny dataset's 8 x 32 x 32 clips
    _tiny_clip_tokenizer(tmp_path)
    convert.convert("xclip", str(tmp_path), str(tmp_path / "xclip"), class_names=CLASSES)
    edge = model_store.load(f"{tiny_pipeline}/edge/model", runtime={"depthwise_impl": "xla"})
    model_store.save(str(tmp_path / "edge"), edge.model_config, edge.class_names, edge.variables,
                     (4, 24, 24, 3), "the tiny edge, at a smaller clip shape")
    config = tiny_config(data_dir, "label", **{
        "edge.path": str(tmp_path / "edge"), "cloud.path": str(tmp_path / "xclip"),
        "label.splits": ("test",)})
    summary = label.run(config, str(tmp_path / "label"))
    labelled = labels.read_split(str(tmp_path / "label"), "test")
    assert labelled["cloud_logits"].shape == (32, 12)  # the dataset's 12 classes, not CLASSES
    assert summary["splits"]["test"]["num_clips"] == 32
    clips = pipeline.open_split(pipeline.make_builder(config.data), config.data, "test").rows(
        np.arange(4))["video"]
    assert clips.shape[1:4] == (8, 32, 32)
    expected = edge.logits_and_features(edge.variables,
                                        pipeline.normalize(pipeline.resample(clips, 4, 24)))[0]
    np.testing.assert_allclose(labelled["edge_logits"][:4], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,words", [
    ("ApplyEyeMakeup", "apply eye makeup"),  # UCF101
    ("brush_hair", "brush hair"),  # HMDB51
    ("playing guitar", "playing guitar"),  # Kinetics: already words
    ("Pushing [something] from left to right", "Pushing [something] from left to right"),  # SSv2
    ("YoYo", "yo yo"),
    ("PUSH", "PUSH"),
])
def test_class_names_are_prompted_as_words(name, words):
    assert text.readable(name) == words
    assert text.prompts((name,), "a video of {}.") == [f"a video of {words}."]
