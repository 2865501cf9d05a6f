"""Per-stage results on disk, keyed by the stage's inputs and options, so that a rerun resumes.

A stage is a plain function; caching wraps it from outside (`StageCache.get_or_compute`). The key hashes the
stage name, its configuration and the keys of the stages it depends on, so changing an option recomputes that
stage and everything after it, and nothing before it.

An entry is a numpy `.npz` read with `allow_pickle=False`, its structure a JSON text inside it that names only
the result types listed in `_result_types` (features, matches, predictions, tracks): a cache folder someone hands
over is data, never code. A damaged or foreign entry (another format version, garbage, a pickle) is recomputed
with a warning. The stages that work image by image or pair by pair (features, matching) write their results into
HDF5 stores beside the entries as they are made (`storage.py`, `StageCache.store_path`), so an interrupted stage
resumes where it stopped; their entry then only refers to the store (`{"stored": ...}`: the file's name, its key
and its groups), which is verified when the entry is read. Without a cache folder the stores go to a temporary
folder that `StageCache.close` removes: they keep a run's memory bounded all the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import storage

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

    def __init__(self, directory: Path) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.types = _result_types()
        self.directory = directory  # where the entry goes: stores it refers to must be there

    def _reference(self, value: storage.FeatureReader | storage.StoredArrays) -> dict[str, Any]:
        if value.path.parent.resolve() != self.directory.resolve():
            raise CacheFormatError(f"{value.path} is not in the cache folder {self.directory}")
        return {"stored": value.reference()}

    def _store(self, array: np.ndarray) -> str:
        if array.dtype.hasobject:
            raise CacheFormatError(f"object arrays are not cached ({array.dtype})")
        name = f"a{len(self.arrays)}"
        self.arrays[name] = np.ascontiguousarray(array)
        return name

    def encode(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return {"array": self._store(value)}
        if isinstance(value, (storage.FeatureReader, storage.StoredArrays)):
            return self._reference(value)
        if isinstance(value, storage.ChainedArrays):
            return {"chain": [self.encode(part) for part in value.parts]}
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


def _decode(node: Any, arrays: Any, types: dict[str, type], directory: Path) -> Any:
    if not isinstance(node, dict) or len(node) == 0:
        raise CacheFormatError("malformed structure")

    def decode(child: Any) -> Any:
        return _decode(child, arrays, types, directory)

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
        return cls(**{k: decode(v) for k, v in node["fields"].items()})
    if "stored" in node:
        return storage.from_reference(node["stored"], directory)
    if "chain" in node:
        return storage.ChainedArrays(*(decode(part) for part in node["chain"]))
    if "arrays" in node:
        data, lengths = arrays[node["arrays"]], arrays[node["lengths"]]
        parts = np.split(data, np.cumsum(lengths)[:-1])
        return parts if node["kind"] == "list" else tuple(parts)
    if "list" in node:
        return [decode(v) for v in node["list"]]
    if "tuple" in node:
        return tuple(decode(v) for v in node["tuple"])
    if "dict" in node:
        return {k: decode(v) for k, v in node["dict"].items()}
    raise CacheFormatError(f"unknown node {sorted(node)}")


def write_entry(path: Path, value: Any) -> None:
    """Store a result at `path` (an .npz), atomically; CacheFormatError when it holds a type we do not store
    (or a store outside `path`'s folder)."""
    encoder = _Encoder(path.parent)
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
    return _decode(structure["result"], arrays, _result_types(), path.parent)


def _read_or_none(path: Path) -> tuple[Any, bool]:
    """(result, True) for a readable entry; (None, False) with a warning for a damaged or foreign one."""
    try:
        return read_entry(path), True
    except Exception as error:  # a damaged cache entry is recomputed, never fatal
        logger.warning("ignoring unreadable cache entry %s (%s); recomputing it", path, error)
        return None, False


class StageCache:
    """Stage results in one folder; `None` as the folder disables caching (the stores then go to a temporary
    folder, removed by `close`)."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self._scratch: Path | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.npz"

    def store_path(self, key: str) -> Path:
        """The HDF5 store of the stage of `key` (`storage.py`): beside its entry, or in the temporary folder."""
        if self.directory is not None:
            return self.directory / f"{key}.h5"
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="vggt_sfm_stages_"))
        return self._scratch / f"{key}.h5"

    def close(self) -> None:
        """Remove the temporary stores (a run without a cache folder); the cache folder stays."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> StageCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        return result, False
