"""Access to the PyTorch reference implementations (parity tests and benchmarks only).

Imports torch lazily: dmd_jax itself never needs it.
"""

from __future__ import annotations

import sys
import types
from typing import Callable


def _torchvision_stand_in() -> None:
    """pytorchvideo imports torchvision for names the references never use (an ROI head,
    a folder-listing helper); torchvision has no CPU wheel that matches torch 2.13, so a
    stand-in module provides those names."""
    if "torchvision" in sys.modules:
        return
    stub = types.ModuleType("torchvision")
    stub.ops = types.ModuleType("torchvision.ops")
    stub.ops.RoIAlign = object
    stub.transforms = types.ModuleType("torchvision.transforms")
    stub.datasets = types.ModuleType("torchvision.datasets")
    stub.datasets.folder = types.ModuleType("torchvision.datasets.folder")

    def make_dataset(*args, **kwargs):
        raise NotImplementedError("the torchvision stand-in lists no folders: pass "
                                  "labeled_video_paths")

    stub.datasets.folder.make_dataset = make_dataset
    sys.modules.update({"torchvision": stub, "torchvision.ops": stub.ops,
                        "torchvision.transforms": stub.transforms,
                        "torchvision.datasets": stub.datasets,
                        "torchvision.datasets.folder": stub.datasets.folder})


def pytorchvideo_create_x3d() -> Callable:
    """`pytorchvideo.models.x3d.create_x3d`, importable without torchvision."""
    _torchvision_stand_in()
    from pytorchvideo.models.x3d import create_x3d
    return create_x3d


def pytorchvideo_data() -> types.ModuleType:
    """`pytorchvideo.data` (LabeledVideoDataset, clip samplers), without torchvision."""
    _torchvision_stand_in()
    import pytorchvideo.data
    return pytorchvideo.data
