"""Reading PyTorch checkpoints without ever running code from them.

A checkpoint from the internet is data, never a program: `.safetensors` files are read
with the safetensors library (no torch needed); `.bin`/`.pt`/`.pth`/`.pyth` files only
through `torch.load(..., weights_only=True)`, whose restricted unpickler refuses any
object that is not a tensor or a plain container. A file that needs more is refused
with an error that suggests safetensors.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dmd_jax.errors import UserError

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pyth")
# The state dict inside training checkpoints (pytorchvideo's model zoo uses `model_state`).
NESTED_KEYS = ("model_state", "state_dict", "model")


class UnsafeCheckpointError(UserError, ValueError):
    """The file holds pickled objects beyond tensors: loading it could run code."""


class CheckpointFormatError(UserError, ValueError):
    """The path is not a checkpoint this converter can read."""


def find_checkpoint(src: str, uses_config: bool = True) -> tuple[str, dict[str, Any] | None]:
    """`(weights file, config.json contents or None)` for a file or a checkpoint folder;
    `config.json` is read only for families whose architecture it describes."""
    if os.path.isdir(src):
        config = _read_config(os.path.join(src, "config.json")) if uses_config else None
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(src, name)):
                return os.path.join(src, name), config
        raise CheckpointFormatError(
            f"folder {src!r} has neither model.safetensors nor pytorch_model.bin; pass the "
            "weights file itself with --src")
    if not os.path.exists(src):
        raise CheckpointFormatError(f"checkpoint {src!r} does not exist")
    config = _read_config(os.path.join(os.path.dirname(src), "config.json")) if uses_config else None
    return src, config


def _read_config(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise CheckpointFormatError(f"{path} is not valid JSON ({err}); download the "
                                    "checkpoint's config.json again") from err


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Parameter name -> float32/int numpy array, from a safetensors or torch file."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return dict(load_file(path))
        except Exception as err:  # noqa: BLE001 - safetensors' own error types vary
            raise CheckpointFormatError(
                f"{path!r} is not a readable .safetensors file ({_first_line(err)}); it is "
                "truncated or damaged: download it again") from err
    if not path.endswith(TORCH_SUFFIXES):
        raise CheckpointFormatError(
            f"{path!r}: unknown checkpoint format; expected .safetensors or one of "
            f"{', '.join(TORCH_SUFFIXES)}")
    return _read_torch(path)


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ModuleNotFoundError as err:
        raise CheckpointFormatError(
            f"{path!r} is a PyTorch file and reading it needs torch (`pip install "
            "torch==2.13.0`), or convert it to .safetensors elsewhere") from err
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path!r} contains pickled objects other than tensors, and loading it could run "
            f"arbitrary code, so it was refused ({str(err).splitlines()[0]}). Use a "
            ".safetensors version of this checkpoint, or re-save only its state_dict "
            "from code you trust.") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointFormatError(
            f"{path!r} is not a readable PyTorch checkpoint ({_first_line(err)}); it is "
            "truncated or damaged: download it again") from err
    for key in NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path!r} does not hold a state dict (found {type(obj)})")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items() if torch.is_tensor(v)}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]
