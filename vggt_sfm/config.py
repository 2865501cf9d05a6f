"""The configuration of a whole run: one small dataclass per stage, and the named presets in `pipelines/`.

A preset is a TOML file with one table per stage (`[features]`, `[pairs]`, `[matching]`, `[view_graph]`, `[tracks]`,
`[mapping]`, `[refine]`, `[sanity]`, `[predict]`, `[output]`, `[backend]`, and `[without_prior]` for `prior = "none"`, a
top-level key); any key it leaves out keeps the stage's default. Unknown keys and wrong types are errors naming
the key, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .executor import BACKENDS, BackendConfig
from .features import FeatureConfig
from .mapping import MappingConfig
from .matching import MatchingConfig
from .pairs import PairsConfig
from .prior_free import WithoutPriorConfig
from .refine import RefineConfig
from .sanity import SanityLimits
from .tracks import TracksConfig
from .view_graph import ViewGraphConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



def _presets_dir() -> Path:
    """`pipelines/` of a source checkout, or the copy a wheel ships inside the package (`vggt_sfm/presets`)."""
    installed = Path(__file__).resolve().parent / "presets"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "pipelines"


PRESETS_DIR = _presets_dir()
EXPORT_FORMATS = ("gsplat", "nerfstudio")


@dataclass
class PredictConfig:
    """How VGGT runs when no predictions file is given."""

    preprocess: str = "crop"  # "crop" | "pad", as the official loader
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "float32" | "bfloat16" | "float16"
    window: int = 0  # 0: all frames in one pass; N >= 2: overlapping windows of N frames in name order (sequences)
    window_overlap: int = 0  # frames shared by consecutive windows; 0: a quarter of the window
    chunks: int = 0  # N >= 2: chunks of at most N images that see the same scene (unordered collections)
    chunk_overlap: int = 0  # frames shared by neighbouring chunks; 0: a fifth of the chunk, at most 8


@dataclass
class OutputConfig:
    """What is written besides `sparse/0`, `points3D.ply` and `summary.json`."""

    text: bool = False  # also write the text model
    database: bool = False  # OUTPUT/database.db in COLMAP 4's schema
    export: list[str] = field(default_factory=list)  # any of EXPORT_FORMATS
    dense_points: int = 0  # > 0: dense initial points from depth for the exports, at most this many
    downscales: list[int] = field(default_factory=list)  # gsplat: also write images_N for these N
    report: bool = True  # OUTPUT/report.html (vggt_sfm/report_html.py)


@dataclass
class PipelineConfig:
    """Every option of a run, grouped by stage."""

    prior: str = "vggt"  # "vggt": initialised by VGGT's predictions; "none": COLMAP's mapper (see prior_free.py)
    predict: PredictConfig = field(default_factory=PredictConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    view_graph: ViewGraphConfig = field(default_factory=ViewGraphConfig)
    tracks: TracksConfig = field(default_factory=TracksConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    sanity: SanityLimits = field(default_factory=SanityLimits)  # what a result must reach to end "ok"
    output: OutputConfig = field(default_factory=OutputConfig)
    without_prior: WithoutPriorConfig = field(default_factory=WithoutPriorConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)  # where the jobs run: this machine or Ray

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except UserError:
                continue
        raise UserError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, key, source) for v in value]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"{source}: '{key}' has a value of the wrong type: {value!r}")


def _update_dataclass(obj: Any, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise UserError(f"{source}: unknown key '{full}' (known keys here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{full}' must be a table")
            changes[key] = _update_dataclass(current, value, f"{full}.", source)
        else:
            changes[key] = _coerce(value, hints[key], full, source)
    return dataclasses.replace(obj, **changes)


def config_from_dict(values: dict[str, Any], source: str = "config", base: PipelineConfig | None = None) -> PipelineConfig:
    """A PipelineConfig from nested dicts (as read from TOML), on top of `base` (default: all defaults)."""
    config = _update_dataclass(base or PipelineConfig(), values, "", source)
    validate_config(config, source)
    return config


def validate_config(config: PipelineConfig, source: str = "config") -> None:
    """Checks that span fields; per-field types are checked when the config is built."""
    for name in config.output.export:
        if name not in EXPORT_FORMATS:
            raise UserError(f"{source}: unknown export '{name}' in output.export (choose from {', '.join(EXPORT_FORMATS)})")
    if config.output.dense_points < 0:
        raise UserError(f"{source}: output.dense_points must be >= 0")
    if config.predict.preprocess not in ("crop", "pad"):
        raise UserError(f"{source}: predict.preprocess must be 'crop' or 'pad'")
    if config.prior not in ("vggt", "none"):
        raise UserError(f"{source}: prior must be 'vggt' or 'none', got {config.prior!r}")
    if config.backend.name not in BACKENDS:
        raise UserError(f"{source}: backend.name must be one of {', '.join(BACKENDS)}, got {config.backend.name!r}")
    if config.predict.window == 1 or config.predict.window < 0:
        raise UserError(f"{source}: predict.window must be 0 (one pass) or at least 2 frames")
    if config.predict.chunks == 1 or config.predict.chunks < 0:
        raise UserError(f"{source}: predict.chunks must be 0 (one pass) or at least 2 frames")
    if config.predict.window_overlap < 0 or config.predict.chunk_overlap < 0:
        raise UserError(f"{source}: predict.window_overlap and predict.chunk_overlap must be >= 0 (0: the default)")
    if config.predict.chunks and config.predict.chunk_overlap >= config.predict.chunks:
        raise UserError(
            f"{source}: predict.chunk_overlap ({config.predict.chunk_overlap}) must be below predict.chunks "
            f"({config.predict.chunks})"
        )
    if config.predict.window and config.predict.chunks:
        raise UserError(
            f"{source}: predict.window (sequences, in name order) and predict.chunks (unordered collections) are two "
            "ways to split the frames; set one of them to 0"
        )


def list_presets() -> dict[str, str]:
    """Names of the presets shipped in `pipelines/`, with the first line of each file's description."""
    presets = {}
    for path in sorted(PRESETS_DIR.glob("*.toml")):
        description = ""
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                description = line.lstrip("# ").strip()
                break
        presets[path.stem] = description
    return presets


def load_preset(name_or_path: str | Path) -> PipelineConfig:
    """Load a preset by name (`default`, `fast`, ...) or from a TOML file path; it inherits `extends` first."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.toml"
        if not path.exists():
            names = ", ".join(list_presets())
            raise UserError(f"unknown pipeline preset '{name_or_path}' (choose from: {names}, or give a .toml file)")
    if not path.exists():
        raise UserError(f"pipeline file not found: {path}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"pipeline file {path} is not valid TOML: {error}") from None
    base = None
    parent = values.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise UserError(f"{path}: 'extends' must name a preset")
        base = load_preset(parent if Path(parent).suffix == "" else path.parent / parent)
    values.pop("description", None)
    return config_from_dict(values, source=str(path), base=base)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `stage.key=value` (value in TOML syntax, bare words taken as strings)."""
    if "=" not in text:
        raise UserError(f"--set expects stage.key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(config: PipelineConfig, overrides: list[tuple[list[str], Any]], source: str = "overrides") -> PipelineConfig:
    """Apply (path, value) overrides such as (['features', 'max_keypoints'], 2048); errors start with `source`."""
    for path, value in overrides:
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        config = _update_dataclass(config, nested, "", source)
    # Checks that span fields see the result of all overrides (one may undo what the preset set with another).
    validate_config(config, source)
    return config
