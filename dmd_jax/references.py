"""Access to the PyTorch reference implementations (parity tests and benchmarks only).

Imports torch lazily: dmd_jax itself never needs it.
"""

from __future__ import annotations

import sys
import types
from typing import Callable


def pytorchvideo_create_x3d() -> Callable:
    """`pytorchvideo.models.x3d.create_x3d`, importable without torchvision.

    pytorchvideo imports torchvision only for an ROI head; torchvision has no CPU wheel
    that matches torch 2.13, so a stand-in module provides the one name it imports.
    """
    if "torchvision" not in sys.modules:
        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")
        stub.ops.RoIAlign = object
        stub.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": stub, "torchvision.ops": stub.ops,
                            "torchvision.transforms": stub.transforms})
    from pytorchvideo.models.x3d import create_x3d
    return create_x3d
