"""vggt-sfm: accurate COLMAP reconstructions from photos, initialised by VGGT's feed-forward predictions.

    import vggt_sfm
    rec = vggt_sfm.reconstruct("scene/images", predictions="scene/predictions.npz")  # -> pycolmap.Reconstruction

The public names are imported lazily, so `import vggt_sfm` stays cheap (no torch until a model is needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "reconstruct": "pipeline",
    "run": "pipeline",
    "ReconstructionResult": "pipeline",
    "ReconstructionSummary": "pipeline",
    "predict": "predict",
    "Predictions": "predictions",
    "load_predictions": "predictions",
    "save_predictions": "predictions",
    "PipelineConfig": "config",
    "load_preset": "config",
    "apply_overrides": "config",
    "list_presets": "config",
    "UserError": "errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'vggt_sfm' has no attribute {name!r}")
