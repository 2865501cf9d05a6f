"""Per-stage results on disk, keyed by the stage's inputs and options, so that a rerun resumes.

A stage is a plain function; caching wraps it from outside (`StageCache.get_or_compute`). The key hashes the
stage name, its configuration and the keys of the stages it depends on, so changing an option recomputes that
stage and everything after it, and nothing before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_VERSION = 1


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


class StageCache:
    """Pickled stage results in one folder; `None` as the folder disables caching."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.pkl"

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        """The cached result for `key`, or compute and store it. Returns (result, was_cached)."""
        path = self.path(key)
        if path is not None and path.exists():
            try:
                with open(path, "rb") as f:
                    return pickle.load(f), True
            except Exception as error:  # a damaged cache entry is recomputed, never fatal
                logger.warning("ignoring unreadable cache entry %s: %s", path, error)
        result = compute()
        if path is not None:
            tmp = path.with_suffix(".partial")
            with open(tmp, "wb") as f:
                pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.replace(path)
        return result, False
