"""pytorchvideo X3D checkpoints convert to the Flax X3D and compute the same logits."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from dmd_jax import convert, model_store
from dmd_jax.convert import mapping, reader

torch = pytest.importorskip("torch")


def _reference(frames: int, size: int, seed: int = 0, **kwargs):
    """A random-weight pytorchvideo X3D in eval mode, BatchNorm statistics randomised too."""
    from dmd_jax.references import pytorchvideo_create_x3d

    torch.manual_seed(seed)
    model = pytorchvideo_create_x3d()(input_clip_length=frames, input_crop_size=size,
                                      head_activation=None, **kwargs).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, torch.nn.Linear):  # the default 0.01 std hides errors
                module.weight.normal_(0.0, 1.0 / module.in_features ** 0.5)
    return model


def _max_logit_error(reference, model: model_store.LoadedModel, frames: int, size: int) -> float:
    x = np.random.default_rng(0).normal(size=(2, 3, frames, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    logits, _ = jax.jit(model.logits_and_features)(model.variables,
                                                   np.transpose(x, (0, 2, 3, 4, 1)))
    assert np.std(expected) > 0.05  # logits large enough for the comparison to mean something
    return float(np.max(np.abs(np.asarray(logits) - expected)))


@pytest.mark.parametrize("frames,size,kwargs", [
    (4, 64, dict(width_factor=0.5, depth_factor=1.0, head_dim_out=128, model_num_class=12)),
    (6, 96, dict(width_factor=2.0, depth_factor=2.2, head_dim_out=2048, model_num_class=400)),
])
def test_cli_converts_a_pyth_checkpoint_to_the_same_logits(tmp_path, frames, size, kwargs):
    reference = _reference(frames, size, **kwargs)
    src = tmp_path / "x3d.pyth"  # pytorchvideo's model zoo layout: {"model_state": ...}
    torch.save({"model_state": reference.state_dict(), "epoch": 3}, src)
    out = subprocess.run(
        [sys.executable, "-m", "dmd_jax.convert", "--family=x3d", f"--src={src}",
         f"--out={tmp_path / 'flax'}", f"--frames={frames}", f"--size={size}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    model = model_store.load(str(tmp_path / "flax"))
    assert model.model_config.width_factor == kwargs["width_factor"]
    assert model.model_config.depth_factor == kwargs["depth_factor"]
    assert len(model.class_names) == kwargs["model_num_class"]
    assert _max_logit_error(reference, model, frames, size) <= 1e-4


def test_safetensors_without_torch_loading(tmp_path):
    from safetensors.torch import save_file

    reference = _reference(4, 64, width_factor=0.5, depth_factor=1.0, head_dim_out=64,
                           model_num_class=5)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    model = convert.convert("x3d", str(tmp_path / "model.safetensors"), str(tmp_path / "out"),
                            4, 64, class_names=tuple("abcde"))
    assert model.class_names == tuple("abcde")
    assert _max_logit_error(reference, model, 4, 64) <= 1e-4


def _state(**kwargs):
    return {k: v.numpy() for k, v in _reference(4, 64, width_factor=0.5, depth_factor=1.0,
                                                 head_dim_out=64, model_num_class=5,
                                                 **kwargs).state_dict().items()}


def _write(tmp_path, state):
    from safetensors.numpy import save_file
    path = str(tmp_path / "model.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return path


def test_unmapped_key_is_named(tmp_path):
    state = _state()
    state["blocks.5.extra_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(mapping.ConversionError, match="'blocks.5.extra_head.weight' \\(3, 3\\)"):
        convert.convert("x3d", _write(tmp_path, state), str(tmp_path / "out"), 4, 64)
    assert not os.path.exists(tmp_path / "out" / "model.json")


def test_missing_key_is_named(tmp_path):
    state = _state()
    del state["blocks.2.res_blocks.0.branch2.conv_b.weight"]
    with pytest.raises(mapping.ConversionError, match="missing key 'blocks.2.res_blocks.0"):
        convert.convert("x3d", _write(tmp_path, state), str(tmp_path / "out"), 4, 64)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    state = _state()
    key = "blocks.1.res_blocks.0.branch2.conv_a.weight"
    state[key] = state[key][:, :, :, :1, :1].repeat(3, axis=3)  # a 3x1 kernel where 1x1 belongs
    with pytest.raises(mapping.ConversionError, match=f"'{key}'.*\\(18, 8, 1, 3, 1\\).*expects"):
        convert.convert("x3d", _write(tmp_path, state), str(tmp_path / "out"), 4, 64)


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2), "payload": _Exploit(marker)}, path)
    with pytest.raises(reader.UnsafeCheckpointError, match="safetensors"):
        reader.read_state_dict(str(path))
    assert not marker.exists()
    out = subprocess.run([sys.executable, "-m", "dmd_jax.convert", "--family=x3d",
                          f"--src={tmp_path}", f"--out={tmp_path / 'out'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "refused" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()
