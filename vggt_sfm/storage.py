"""Stage storage on disk, read on demand: per-image features and per-pair matches in HDF5 files.

As hloc does, a features file has one group per image (`keypoints`, `descriptors`, `scores`, `colors` and the
image's attributes) and a matches file one group per pair (`NAME_I/NAME_J`: `matches`, `scores`). A stage writes
its file group by group as its results come (each group marked complete last, then flushed), so an interrupted
stage resumes with the groups it had finished; the readers (`FeatureReader`, `StoredArrays`) load one image or
one pair when asked, so no stage holds every image's descriptors or every pair's raw matches at once.

A file is keyed like the stage cache (`cache.stage_key`): its attributes name the format, its version, its kind
and the key. A file that is not HDF5, was written for another key or another version, or a group whose data
fails its checksum (every dataset has HDF5's Fletcher-32 filter) or its expected shape, is recomputed with a
warning. HDF5 is data: only numeric datasets and plain attributes are read, nothing that could run code.

Pickled (by a remote executor, Ray), a reader sends its content, not its path: remote workers need no access
to the files, as when every result was held in memory. Forked local workers inherit the reader and open the
file themselves (each read opens it anew, so no HDF5 handle crosses a fork).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    from .features import Features

logger = logging.getLogger(__name__)

FORMAT = "vggt-sfm-store"
VERSION = 1
_COMPLETE = "complete"


class StoreError(ValueError):
    """A store file or group that is not one this version wrote for this key, or that is damaged."""


def group_name(name: str) -> str:
    """An image name as one HDF5 group name ('/' separates groups; '%' escapes)."""
    return name.replace("%", "%25").replace("/", "%2F")


def pair_group(name_i: str, name_j: str) -> str:
    """The group of the pair (image i, image j): a group per pair under the first image's, as hloc names them."""
    return f"{group_name(name_i)}/{group_name(name_j)}"


def _open_read(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as error:
        raise StoreError(f"cannot read {path}: {error}") from None


def _check_file(handle: h5py.File, kind: str, key: str) -> None:
    attrs = handle.attrs
    if attrs.get("format") != FORMAT or attrs.get("kind") != kind:
        raise StoreError(f"not a vggt-sfm {kind} store")
    if attrs.get("version") != VERSION:
        raise StoreError(f"store version {attrs.get('version')}, this vggt-sfm reads {VERSION}")
    if attrs.get("key") != key:
        raise StoreError(f"written for {attrs.get('key')}, not {key}")


def _array(group: h5py.Group, name: str, kinds: str, ndim: int) -> np.ndarray:
    """A numeric dataset of `group` (dtype kind in `kinds`, `ndim` dimensions), read whole (checksums checked)."""
    dataset = group.get(name)
    if not isinstance(dataset, h5py.Dataset):
        raise StoreError(f"{group.name}: no dataset {name!r}")
    if dataset.dtype.kind not in kinds or len(dataset.shape) != ndim:
        raise StoreError(f"{group.name}/{name}: {dataset.dtype} {dataset.shape} is not what this version writes")
    try:
        return dataset[()]
    except OSError as error:  # a Fletcher-32 mismatch or an unreadable chunk
        raise StoreError(f"{group.name}/{name}: {error}") from None


def _complete_group(handle: h5py.File, name: str) -> h5py.Group:
    group = handle.get(name)
    flag = group.attrs.get(_COMPLETE) if isinstance(group, h5py.Group) else None
    if not (isinstance(flag, (bool, np.bool_)) and flag):
        raise StoreError(f"no complete group {name!r}")
    return group


def _write_array(group: h5py.Group, name: str, value: np.ndarray) -> None:
    group.create_dataset(name, data=np.ascontiguousarray(value), fletcher32=True)


# ---------------------------------------------------------------------------------------------------------------
# Writing


class _StoreWriter:
    """One store file opened for writing for a stage key; a damaged or foreign file is replaced, with a warning."""

    kind = "store"

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self._open()

    def _open(self) -> h5py.File:
        if self.path.exists():
            try:
                handle = h5py.File(self.path, "a")
            except (OSError, ValueError) as error:
                logger.warning("ignoring unreadable %s store %s (%s); recomputing it", self.kind, self.path, error)
            else:
                try:
                    _check_file(handle, self.kind, self.key)
                    return handle
                except StoreError as error:
                    handle.close()
                    logger.warning("ignoring %s store %s (%s); recomputing it", self.kind, self.path, error)
            self.path.unlink()
        handle = h5py.File(self.path, "w")
        handle.attrs.update({"format": FORMAT, "version": VERSION, "kind": self.kind, "key": self.key})
        handle.flush()
        return handle

    def _done(self, name: str, check) -> bool:
        """Whether group `name` is stored and sound (`check(group)` raises StoreError otherwise); a damaged or
        unfinished group is removed (with a warning when damaged) so that it is written again."""
        if name not in self.handle:
            return False
        try:
            check(_complete_group(self.handle, name))
            return True
        except StoreError as error:
            if self.handle[name].attrs.get(_COMPLETE) is not None:
                logger.warning("recomputing %s of %s (%s)", name, self.path, error)
            del self.handle[name]
            return False

    def _group(self, name: str) -> h5py.Group:
        if name in self.handle:
            del self.handle[name]
        return self.handle.create_group(name)

    def _finish(self, group: h5py.Group) -> None:
        group.attrs[_COMPLETE] = True  # last: a group without it was interrupted while written
        self.handle.flush()

    def close(self) -> None:
        if self.handle.id.valid:
            self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class FeatureStore(_StoreWriter):
    """The features of a collection's images, one group per image, written as they are extracted."""

    kind = "features"

    def done(self, name: str) -> bool:
        """Whether image `name`'s features are stored (and read back sound)."""
        return self._done(group_name(name), _read_features)

    def put(self, name: str, features: Features) -> None:
        group = self._group(group_name(name))
        _write_array(group, "keypoints", np.asarray(features.keypoints, dtype=np.float64).reshape(-1, 2))
        _write_array(group, "descriptors", np.asarray(features.descriptors, dtype=np.float32))
        _write_array(group, "scores", np.asarray(features.scores, dtype=np.float32))
        if features.colors is not None:
            _write_array(group, "colors", np.asarray(features.colors, dtype=np.uint8).reshape(-1, 3))
        group.attrs.update({
            "image_size": np.asarray(features.image_size, dtype=np.int64),
            "extractor": str(features.extractor),
            "resize_scale": float(features.resize_scale),
        })  # fmt: skip
        self._finish(group)

    def reader(self, names: list[str]) -> FeatureReader:
        """A lazy reader of the stored features of `names`, in that order (the writer may stay open)."""
        return FeatureReader(self.path, self.key, names)


class MatchStore(_StoreWriter):
    """The matches of image pairs, one group per pair, written as the pairs are matched."""

    kind = "matches"

    def __init__(self, path: Path, key: str, names: list[str]) -> None:
        super().__init__(path, key)
        self.names = list(names)

    def group(self, i: int, j: int) -> str:
        return pair_group(self.names[i], self.names[j])

    def done(self, i: int, j: int) -> bool:
        return self._done(self.group(i, j), _read_match_group)

    def put(self, i: int, j: int, matches: np.ndarray, scores: np.ndarray) -> None:
        group = self._group(self.group(i, j))
        _write_array(group, "matches", np.asarray(matches, dtype=np.int64).reshape(-1, 2))
        _write_array(group, "scores", np.asarray(scores, dtype=np.float32).reshape(-1))
        self._finish(group)

    def arrays(self, pairs: np.ndarray, dataset: str) -> StoredArrays:
        """`dataset` ("matches" or "scores") of each of `pairs` (P,2), read on demand."""
        return StoredArrays(self.path, self.key, [self.group(int(i), int(j)) for i, j in pairs], dataset)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _read_features(group: h5py.Group) -> Features:
    from .features import Features

    keypoints = _array(group, "keypoints", "f", 2)
    descriptors = _array(group, "descriptors", "f", 2)
    scores = _array(group, "scores", "f", 1)
    colors = _array(group, "colors", "u", 2) if "colors" in group else None
    size = np.asarray(group.attrs.get("image_size", ()))
    extractor, scale = group.attrs.get("extractor"), group.attrs.get("resize_scale")
    count = len(keypoints)
    if keypoints.shape[1:] != (2,) or len(descriptors) != count or len(scores) != count:
        raise StoreError(f"{group.name}: keypoints, descriptors and scores disagree")
    if colors is not None and colors.shape != (count, 3):
        raise StoreError(f"{group.name}: colours of {colors.shape} for {count} keypoints")
    if size.shape != (2,) or size.dtype.kind not in "iu" or not isinstance(extractor, str):
        raise StoreError(f"{group.name}: bad attributes")
    if not isinstance(scale, (float, np.floating)):
        raise StoreError(f"{group.name}: bad resize_scale")
    return Features(
        keypoints=np.ascontiguousarray(keypoints, dtype=np.float64),
        descriptors=np.ascontiguousarray(descriptors, dtype=np.float32),
        scores=np.ascontiguousarray(scores, dtype=np.float32),
        image_size=(int(size[0]), int(size[1])),
        extractor=extractor,
        resize_scale=float(scale),
        colors=colors,
    )


def _read_match_group(group: h5py.Group) -> None:
    matches = _array(group, "matches", "iu", 2)
    scores = _array(group, "scores", "f", 1)
    if matches.shape[1:] != (2,) or len(scores) != len(matches):
        raise StoreError(f"{group.name}: matches and scores disagree")


# The images a FeatureReader keeps, in bytes of their arrays: matching and verification read each image for
# several pairs, and forked workers inherit what the parent kept. 128 MiB holds every image of 100 views at the
# default 2048 SIFT keypoints (1.1 MB each). Keeping 16 images instead cost lego100 about 4 s of 130 (one process,
# same load: verification 4.1 s against 2.4 s with every image in memory, view graph 11.0 against 8.8 s); with
# this cache, 1.4 against 1.3 s and 3.4 against 3.4 s. Beyond it, the images read longest ago are dropped.
CACHE_BYTES = 128 * 2**20


def _nbytes(features: Features) -> int:
    arrays = (features.keypoints, features.descriptors, features.scores, features.colors)
    return sum(a.nbytes for a in arrays if a is not None)


class FeatureReader(Sequence):
    """The stored features of a list of images, as a sequence of `Features` loaded one image at a time.

    The images read last are kept, up to `cache_bytes` of their arrays (see CACHE_BYTES); nothing else stays in
    memory. `num_keypoints()` reads only the files' metadata.
    """

    def __init__(self, path: Path, key: str, names: list[str], cache_bytes: int = CACHE_BYTES) -> None:
        self.path, self.key, self.names = Path(path), key, list(names)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, Features] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # IndexError out of range, negative indices from the end
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        with _open_read(self.path) as handle:
            features = _read_features(_complete_group(handle, group_name(self.names[index])))
        self._cache[index] = features
        self._cached_bytes += _nbytes(features)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= _nbytes(dropped)
        return features

    def __iter__(self) -> Iterator[Features]:
        for index in range(len(self)):
            yield self[index]

    def num_keypoints(self) -> list[int]:
        """Keypoints per image, from the datasets' shapes (no data read)."""
        with _open_read(self.path) as handle:
            return [int(_complete_group(handle, group_name(n))["keypoints"].shape[0]) for n in self.names]

    def verify(self) -> None:
        """Read every image once (checksums, shapes): StoreError when the file is not this key's or damaged."""
        with _open_read(self.path) as handle:
            _check_file(handle, FeatureStore.kind, self.key)
            for name in self.names:
                _read_features(_complete_group(handle, group_name(name)))

    def reference(self) -> dict[str, Any]:
        """What a cache entry records to find this reader again (`from_reference`)."""
        return {"type": "features", "file": self.path.name, "key": self.key, "names": self.names}

    def __reduce__(self):
        return (list, (list(self),))  # by value: see the module docstring


class StoredArrays(Sequence):
    """One dataset (e.g. "matches") of each of a list of groups of a store file, read when indexed."""

    def __init__(self, path: Path, key: str, groups: list[str], dataset: str) -> None:
        self.path, self.key, self.groups, self.dataset = Path(path), key, list(groups), dataset

    def __len__(self) -> int:
        return len(self.groups)

    def _read(self, handle: h5py.File, index: int) -> np.ndarray:
        kinds, ndim = ("iu", 2) if self.dataset == "matches" else ("f", 1)
        return _array(_complete_group(handle, self.groups[index]), self.dataset, kinds, ndim)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        with _open_read(self.path) as handle:
            return self._read(handle, index)

    def __iter__(self) -> Iterator[np.ndarray]:
        """One array at a time, the file opened once."""
        with _open_read(self.path) as handle:
            for index in range(len(self)):
                yield self._read(handle, index)

    def verify(self) -> None:
        with _open_read(self.path) as handle:
            _check_file(handle, MatchStore.kind, self.key)
            for group in self.groups:
                _read_match_group(_complete_group(handle, group))

    def reference(self) -> dict[str, Any]:
        return {"type": "arrays", "file": self.path.name, "key": self.key, "groups": self.groups,
                "dataset": self.dataset}  # fmt: skip

    def __reduce__(self):
        return (list, (list(self),))


class ChainedArrays(Sequence):
    """Sequences one after the other (stored and in-memory parts alike), none of them copied."""

    def __init__(self, *parts: Sequence) -> None:
        self.parts = [p for part in parts for p in (part.parts if isinstance(part, ChainedArrays) else [part])]
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part][index - int(self._starts[part])]

    def __iter__(self) -> Iterator[np.ndarray]:
        for part in self.parts:
            yield from part

    def __reduce__(self):
        return (list, (list(self),))


def chain(*parts: Sequence) -> Sequence:
    """`parts` one after the other: a plain list when all are lists, else a `ChainedArrays` that reads stored
    parts on demand."""
    if all(isinstance(p, list) for p in parts):
        return [item for p in parts for item in p]
    return ChainedArrays(*parts)


def from_reference(node: Any, directory: Path) -> FeatureReader | StoredArrays:
    """The reader a cache entry in `directory` recorded (`reference()`), verified: StoreError when its file is
    missing, outside `directory`, another key's, or damaged."""
    if not isinstance(node, dict) or node.get("type") not in ("features", "arrays"):
        raise StoreError("malformed store reference")
    name, key = node.get("file"), node.get("key")
    if not isinstance(name, str) or not isinstance(key, str) or Path(name).name != name or name in ("", ".", ".."):
        raise StoreError("a store reference must name a file beside the cache entry")
    path = directory / name
    if node["type"] == "features":
        names = node.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StoreError("malformed store reference")
        reader: FeatureReader | StoredArrays = FeatureReader(path, key, names)
    else:
        groups, dataset = node.get("groups"), node.get("dataset")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups) or dataset not in ("matches", "scores"):
            raise StoreError("malformed store reference")
        reader = StoredArrays(path, key, groups, dataset)
    reader.verify()
    return reader


def num_keypoints(features: Sequence[Features]) -> list[int]:
    """Keypoints per image of a feature list or a `FeatureReader` (whose metadata suffices)."""
    if isinstance(features, FeatureReader):
        return features.num_keypoints()
    return [len(f.keypoints) for f in features]
