"""Per-stage results on disk, keyed by the stage's inputs and options, so that a rerun resumes.

A stage is a plain function; caching wraps it from outside (`StageCache.get_or_compute`). The key hashes the
stage name, its configuration and the keys of the stages it depends on, so changing an option recomputes that
stage and everything after it, and nothing before it.

An entry is a numpy `.npz` read with `allow_pickle=False`, its structure a JSON text inside it that names only
the result types listed in `_result_types` (features, matches, predictions, tracks): a cache folder someone hands
over is data, never code. A damaged or foreign entry (another format version, garbage, a pickle) is recomputed
with a warning. Stages that work image by image (features) also keep each image's result as it is made
(`StageCache.items`), so an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_VERSION = 1  # part of every key: bump it only to invalidate every cache
ENTRY_FORMAT = "vggt-sfm-cache"
ENTRY_VERSION = 2  # the file format (1 was pickle)
_STRUCTURE_KEY = "structure.json"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def stage_key(stage: str, *parts: Any) -> str:
    """A short stable hash of a stage's name and everything its result depends on."""
    payload = json.dumps([CACHE_VERSION, stage, [_jsonable(p) for p in parts]], sort_keys=True)
    return f"{stage}-{hashlib.sha1(payload.encode()).hexdigest()[:16]}"


def file_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Name, size and modification time of each file: cheap and enough to notice a changed input."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append((path.name, stat.st_size, stat.st_mtime_ns))
    return out


class CacheFormatError(ValueError):
    """A cache entry that is not one this version wrote (or a result it cannot store)."""


def _result_types() -> dict[str, type]:
    """The only classes an entry may rebuild (imported here, late: the stage modules import this one's users)."""
    from .features import Features
    from .matching import PairMatches, VerifiedMatches
    from .predictions import Predictions
    from .prior import PriorCameras
    from .tracks import Tracks
    from .view_graph import CheckedPrior, ViewGraphReport

    classes = (Features, PairMatches, VerifiedMatches, Predictions, Tracks, PriorCameras, CheckedPrior, ViewGraphReport)
    return {cls.__name__: cls for cls in classes}


class _Encoder:
    """A result as JSON structure plus numpy arrays (lists of like arrays are stored concatenated, as one)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.types = _result_types()

    def _store(self, array: np.ndarray) -> str:
        if array.dtype.hasobject:
            raise CacheFormatError(f"object arrays are not cached ({array.dtype})")
        name = f"a{len(self.arrays)}"
        self.arrays[name] = np.ascontiguousarray(array)
        return name

    def encode(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return {"array": self._store(value)}
        if isinstance(value, np.generic):
            return {"scalar": self._store(np.asarray(value))}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            name = type(value).__name__
            if self.types.get(name) is not type(value):
                raise CacheFormatError(f"{name} is not a cacheable result type")
            fields = {f.name: self.encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
            return {"dataclass": name, "fields": fields}
        if isinstance(value, (list, tuple)):
            kind = "list" if isinstance(value, list) else "tuple"
            if len(value) > 1 and all(isinstance(v, np.ndarray) and v.ndim >= 1 for v in value):
                first = value[0]
                if all(v.dtype == first.dtype and v.shape[1:] == first.shape[1:] for v in value):
                    lengths = np.array([len(v) for v in value], dtype=np.int64)
                    return {"arrays": self._store(np.concatenate(value)), "lengths": self._store(lengths), "kind": kind}
            return {kind: [self.encode(v) for v in value]}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise CacheFormatError("only dicts with string keys are cached")
            return {"dict": {k: self.encode(v) for k, v in value.items()}}
        if isinstance(value, (str, int, float, bool)) or value is None:
            return {"value": value}
        raise CacheFormatError(f"a {type(value).__name__} is not a cacheable result")


def _decode(node: Any, arrays: Any, types: dict[str, type]) -> Any:
    if not isinstance(node, dict) or len(node) == 0:
        raise CacheFormatError("malformed structure")
    if "value" in node:
        return node["value"]
    if "array" in node:
        return arrays[node["array"]]
    if "scalar" in node:
        return arrays[node["scalar"]][()]
    if "dataclass" in node:
        cls = types.get(node["dataclass"])
        if cls is None:
            raise CacheFormatError(f"unknown result type {node['dataclass']!r}")
        return cls(**{k: _decode(v, arrays, types) for k, v in node["fields"].items()})
    if "arrays" in node:
        data, lengths = arrays[node["arrays"]], arrays[node["lengths"]]
        parts = np.split(data, np.cumsum(lengths)[:-1])
        return parts if node["kind"] == "list" else tuple(parts)
    if "list" in node:
        return [_decode(v, arrays, types) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, arrays, types) for v in node["tuple"])
    if "dict" in node:
        return {k: _decode(v, arrays, types) for k, v in node["dict"].items()}
    raise CacheFormatError(f"unknown node {sorted(node)}")


def write_entry(path: Path, value: Any) -> None:
    """Store a result at `path` (an .npz), atomically; CacheFormatError when it holds a type we do not store."""
    encoder = _Encoder()
    structure = {"format": ENTRY_FORMAT, "version": ENTRY_VERSION, "result": encoder.encode(value)}
    arrays = dict(encoder.arrays)
    arrays[_STRUCTURE_KEY] = np.array(json.dumps(structure))
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_entry(path: Path) -> Any:
    """The result stored at `path`; CacheFormatError (or OSError) when it is not an entry this version wrote."""
    if not zipfile.is_zipfile(path):
        raise CacheFormatError("not an .npz cache entry")
    with np.load(path, allow_pickle=False) as data:
        if _STRUCTURE_KEY not in data.files:
            raise CacheFormatError("no structure")
        structure = json.loads(str(data[_STRUCTURE_KEY][()]))
        if not isinstance(structure, dict) or structure.get("format") != ENTRY_FORMAT:
            raise CacheFormatError("not a vggt-sfm cache entry")
        if structure.get("version") != ENTRY_VERSION:
            raise CacheFormatError(f"format version {structure.get('version')}, this vggt-sfm reads {ENTRY_VERSION}")
        arrays = {name: data[name] for name in data.files if name != _STRUCTURE_KEY}
    return _decode(structure["result"], arrays, _result_types())


def _read_or_none(path: Path) -> tuple[Any, bool]:
    """(result, True) for a readable entry; (None, False) with a warning for a damaged or foreign one."""
    try:
        return read_entry(path), True
    except Exception as error:  # a damaged cache entry is recomputed, never fatal
        logger.warning("ignoring unreadable cache entry %s (%s); recomputing it", path, error)
        return None, False


class ItemCache:
    """The results of one stage's items (one per image), each in its own entry, made as the stage goes."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, item: str) -> Path:
        return self.directory / f"{hashlib.sha1(item.encode()).hexdigest()[:16]}.npz"

    def get(self, item: str) -> tuple[Any, bool]:
        """(result, True) when `item` was stored, else (None, False)."""
        path = self._path(item)
        return _read_or_none(path) if path.exists() else (None, False)

    def put(self, item: str, value: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_entry(self._path(item), value)


class StageCache:
    """Stage results in one folder; `None` as the folder disables caching."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.npz"

    def items(self, key: str) -> ItemCache | None:
        """Where the stage of `key` keeps its per-item results until the whole result is stored."""
        return None if self.directory is None else ItemCache(self.directory / f"{key}.items")

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        """The cached result for `key`, or compute and store it. Returns (result, was_cached)."""
        path = self.path(key)
        if path is not None and path.exists():
            result, found = _read_or_none(path)
            if found:
                return result, True
        result = compute()
        if path is not None:
            try:
                write_entry(path, result)
            except CacheFormatError as error:  # a result we cannot store is a bug to see, but not to fail on
                logger.warning("not caching %s: %s", key, error)
            else:
                shutil.rmtree(self.directory / f"{key}.items", ignore_errors=True)
        return result, False
