"""transformers VideoMAE checkpoints convert to the Flax VideoMAE and compute the same logits."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from dmd_jax import convert, model_store
from dmd_jax.convert import mapping

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             num_labels=5, image_size=32, patch_size=8, num_frames=4, tubelet_size=2)


def _reference(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.VideoMAEConfig(**{**SMALL, **overrides})
    model = transformers.VideoMAEForVideoClassification(config).eval()
    with torch.no_grad():  # unit-scale weights (the 0.02 init hides errors), biases non-zero
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _max_logit_error(reference, model: model_store.LoadedModel) -> float:
    c = reference.config
    x = np.random.default_rng(0).normal(
        size=(2, c.num_frames, 3, c.image_size, c.image_size)).astype(np.float32)
    with torch.no_grad():
        expected = reference(pixel_values=torch.from_numpy(x)).logits.numpy()
    logits, _ = jax.jit(model.logits_and_features)(model.variables,
                                                   np.transpose(x, (0, 1, 3, 4, 2)))
    assert np.std(expected) > 0.05
    return float(np.max(np.abs(np.asarray(logits) - expected)))


@pytest.mark.parametrize("overrides", [
    dict(),  # mean pooling + fc_norm, query/value biases: the fine-tuned Kinetics layout
    dict(use_mean_pooling=False, qv_bias=False),  # first token after the last LayerNorm
    dict(num_frames=6, tubelet_size=3, patch_size=4, image_size=16),
])
def test_cli_converts_save_pretrained_folder(tmp_path, overrides):
    reference = _reference(**overrides)
    reference.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    out = subprocess.run(
        [sys.executable, "-m", "dmd_jax.convert", "--family=videomae", f"--src={tmp_path / 'hf'}",
         f"--out={tmp_path / 'flax'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    model = model_store.load(str(tmp_path / "flax"))
    assert model.input_shape == (reference.config.num_frames, reference.config.image_size,
                                 reference.config.image_size, 3)
    assert model.class_names == tuple(reference.config.id2label[i] for i in range(5))
    assert _max_logit_error(reference, model) <= 1e-4


def test_original_q_bias_v_bias_bin_checkpoint(tmp_path):
    """Checkpoints saved before transformers 5 name the biases q_bias and v_bias."""
    reference = _reference(seed=1)
    state = {k.replace("query.bias", "q_bias").replace("value.bias", "v_bias"): v
             for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = reference.config.to_dict()
    config.pop("qv_bias", None)
    config["qkv_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = convert.convert("videomae", str(tmp_path), str(tmp_path / "flax"))
    assert _max_logit_error(reference, model) <= 1e-4


def test_image_size_as_height_and_width(tmp_path):
    """transformers accepts `image_size: [H, W]`: square frames convert, others are refused
    by name (the converter used to crash with a TypeError)."""
    reference = _reference(seed=2)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["image_size"] = [32, 32]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = convert.convert("videomae", str(tmp_path), str(tmp_path / "square"))
    assert model.input_shape == (4, 32, 32, 3)
    assert _max_logit_error(reference, model) <= 1e-4
    config["image_size"] = [32, 16]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mapping.ConversionError, match="image_size.*square"):
        convert.convert("videomae", str(tmp_path), str(tmp_path / "oblong"))


@pytest.mark.parametrize("field,value", [("use_learnable_pos_emb", True),
                                         ("hidden_act", "relu"), ("num_channels", 1),
                                         ("layer_scale_init_value", 0.1)])
def test_config_fields_it_cannot_honour_are_refused_by_name(tmp_path, field, value):
    _reference().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mapping.ConversionError, match=field):
        convert.convert("videomae", str(tmp_path), str(tmp_path / "flax"))
    assert not (tmp_path / "flax" / "model.json").exists()
