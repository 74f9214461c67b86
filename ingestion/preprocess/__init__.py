"""Per-scan preprocessing into model-ready volumes (issue 5): reorient, N4, MNI152 registration, atlas mask, crop, z-score, QC.

Names are imported lazily so that reading the config (``PreprocessConfig``, part of every run config) does not load
SimpleITK and the template for a command that never preprocesses.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PreprocessConfig",
    "PreprocessResult",
    "VoxelDefect",
    "check_voxels",
    "preload",
    "preprocess_scan",
    "to_native",
]

_WHERE = {
    "PreprocessConfig": "config",
    "PreprocessResult": "core",
    "VoxelDefect": "core",
    "check_voxels": "core",
    "preload": "core",
    "preprocess_scan": "core",
    "to_native": "steps",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
