"""What `summary.json` and the end of a run say: labelled errors, the list of written paths, strict JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BEFORE_BA_KEY = "mean_reprojection_error_before_bundle_adjustment_px"
AFTER_BA_KEY = "mean_reprojection_error_after_bundle_adjustment_px"


def label_reprojection_errors(details: dict[str, Any]) -> float | None:
    """Rename the stage reports' `mean_reprojection_error` to say which model it measures; returns the initial one.

    The mapping report's error is the initial model's (triangulated from the prior, before bundle adjustment),
    the refine report's the final model's, so the two keys are named for that. None when it is not finite.
    """
    initial = None
    for stage, key in (("mapping", BEFORE_BA_KEY), ("refine", AFTER_BA_KEY)):
        report = details.get(stage)
        if isinstance(report, dict) and "mean_reprojection_error" in report:
            value = report.pop("mean_reprojection_error")
            report[key] = value
            if stage == "mapping" and isinstance(value, (int, float)) and math.isfinite(value):
                initial = float(value)
    return initial


def output_entries(folder: Path) -> list[str]:
    """The paths a run wrote, relative to its output folder: each model folder, file and export folder."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name == "sparse" and path.is_dir():
            entries += [f"sparse/{model.name}/" for model in sorted(path.iterdir()) if model.is_dir()]
        else:
            entries.append(path.name + ("/" if path.is_dir() else ""))
    return entries


def json_ready(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, so that `json.dumps` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value
