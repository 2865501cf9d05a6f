"""Stage storage (vggt_sfm/storage.py): features and matches in HDF5, read one image / one pair at a time,
written as they are made (an interrupted stage resumes), damaged or foreign files recomputed with a warning."""

from __future__ import annotations

import logging
import pickle
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from vggt_sfm import cache as cache_module
from vggt_sfm import features as features_module
from vggt_sfm import matching as matching_module
from vggt_sfm import pipeline
from vggt_sfm.config import config_from_dict
from vggt_sfm.features import FeatureConfig, Features, extract_features
from vggt_sfm.matching import MatchingConfig, match_pairs, verify_matches
from vggt_sfm.predictions import load_predictions
from vggt_sfm.storage import FeatureReader, FeatureStore, MatchStore, StoredArrays, StoreError, group_name

ROOT = Path(__file__).resolve().parents[1]
TEMPLE = ROOT / "data" / "templeSR"
TEMPLE_NAMES = sorted(p.name for p in (TEMPLE / "images").iterdir())[:4]
SIFT = FeatureConfig(extractor="sift", sift_backend="opencv", max_keypoints=256, resize_max=320, num_workers=1)


def _features(rng: np.random.Generator, count: int, dims: int = 128, colors: bool = True) -> Features:
    return Features(
        keypoints=rng.random((count, 2)) * 600,
        descriptors=rng.random((count, dims)).astype(np.float32),
        scores=rng.random(count).astype(np.float32),
        image_size=(640, 480),
        extractor="sift",
        resize_scale=1.25,
        colors=rng.integers(0, 255, (count, 3)).astype(np.uint8) if colors else None,
    )


def _equal(a: Features, b: Features) -> bool:
    arrays = ("keypoints", "descriptors", "scores")
    same = all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype for k in arrays)
    colors = (a.colors is None and b.colors is None) or (
        a.colors is not None and b.colors is not None and np.array_equal(a.colors, b.colors)
    )
    return same and colors and (a.image_size, a.extractor, a.resize_scale) == (b.image_size, b.extractor, b.resize_scale)


def _flip_data(path: Path, dataset: str) -> None:
    """Overwrite a few bytes inside a dataset's data on disk (its checksum then fails)."""
    with h5py.File(path, "r") as handle:
        offset = handle[dataset].id.get_chunk_info(0).byte_offset  # chunked: the checksum filter needs chunks
    with open(path, "r+b") as raw:
        raw.seek(offset + 8)
        raw.write(b"\xff\x00\xff\x00\xff\x00\xff\x00")


# ---------------------------------------------------------------------------------------------------------------
# Round trip


def test_features_and_matches_round_trip_through_their_stores(tmp_path: Path):
    rng = np.random.default_rng(0)
    names = ["a.png", "sub/b.png", "c%2F.png"]  # '/' and '%' are escaped into one group name each
    written = [_features(rng, 50), _features(rng, 0, colors=False), _features(rng, 7)]
    with FeatureStore(tmp_path / "features.h5", "key-f") as store:
        for name, features in zip(names, written):
            store.put(name, features)
        reader = store.reader(names)
    with h5py.File(tmp_path / "features.h5", "r") as handle:
        assert sorted(handle) == sorted(group_name(n) for n in names)  # one group per image
    assert len(reader) == 3 and reader.num_keypoints() == [50, 0, 7]
    assert all(_equal(r, w) for r, w in zip(reader, written))
    assert _equal(reader[-1], written[2]) and len(reader[1:]) == 2
    # Pickled (a remote executor), the reader travels as its content.
    assert all(_equal(r, w) for r, w in zip(pickle.loads(pickle.dumps(reader)), written))

    pairs = np.array([[0, 1], [0, 2], [1, 2]])
    matches = [rng.integers(0, 7, (k, 2)) for k in (5, 0, 3)]
    scores = [rng.random(len(m)).astype(np.float32) for m in matches]
    with MatchStore(tmp_path / "matches.h5", "key-m", names) as store:
        for (i, j), m, s in zip(pairs, matches, scores):
            store.put(int(i), int(j), m, s)
        stored, stored_scores = store.arrays(pairs, "matches"), store.arrays(pairs, "scores")
    assert all(np.array_equal(a, b) for a, b in zip(stored, matches))
    assert all(np.array_equal(a, b) for a, b in zip(stored_scores, scores))

    # A cache entry refers to the stores beside it, and reads back as readers of them.
    for value in (reader, stored):
        cache_module.write_entry(tmp_path / "entry.npz", value)
        back = cache_module.read_entry(tmp_path / "entry.npz")
        assert type(back) is type(value) and len(back) == len(value)
    assert (tmp_path / "entry.npz").stat().st_size < 4096, "the entry holds references, not the data"


def test_a_store_outside_the_cache_folder_is_not_referenced(tmp_path: Path, caplog):
    with FeatureStore(tmp_path / "elsewhere" / "features.h5", "k") as store:
        store.put("a.png", _features(np.random.default_rng(0), 3))
        reader = store.reader(["a.png"])
    cache = cache_module.StageCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        value, cached = cache.get_or_compute("features-x", lambda: reader)
    assert value is reader and not cached and "not in the cache folder" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Lazy reads


def test_the_feature_reader_holds_a_few_images_not_all(tmp_path: Path):
    rng = np.random.default_rng(1)
    names = [f"{k:03d}.png" for k in range(24)]
    one_image = 4096 * 128 * 4  # bytes of one image's descriptors
    with FeatureStore(tmp_path / "features.h5", "k") as store:
        for name in names:
            store.put(name, _features(rng, 4096))
    reader = FeatureReader(tmp_path / "features.h5", "k", names, cache_bytes=2 * one_image + 2**16)
    tracemalloc.start()
    try:
        counts = [len(f.descriptors) for f in reader]  # every image, one after the other
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts == [4096] * 24
    # All 24 images' descriptors are 48 MiB; the reader never held more than its cache (2 images) and the one read.
    assert peak < 4 * one_image, f"peak {peak / 2**20:.1f} MiB"
    assert reader.num_keypoints() == [4096] * 24


def test_only_the_requested_pair_or_image_is_read(tmp_path: Path):
    """Each entry is read when asked, and only then: the others can be damaged without being noticed."""
    rng = np.random.default_rng(2)
    names = ["a.png", "b.png", "c.png"]
    with MatchStore(tmp_path / "matches.h5", "k", names) as store:
        for i, j in ((0, 1), (0, 2), (1, 2)):
            store.put(i, j, rng.integers(0, 100, (200, 2)), rng.random(200))
        stored = store.arrays(np.array([[0, 1], [0, 2], [1, 2]]), "matches")
    with FeatureStore(tmp_path / "features.h5", "k") as store:
        for name in names:
            store.put(name, _features(rng, 300))
    reader = FeatureReader(tmp_path / "features.h5", "k", names)
    _flip_data(tmp_path / "matches.h5", "a.png/c.png/matches")
    _flip_data(tmp_path / "features.h5", "c.png/descriptors")
    assert stored[0].shape == (200, 2) and stored[2].shape == (200, 2)
    assert reader[0].num_keypoints == 300 and reader[1].num_keypoints == 300
    with pytest.raises(StoreError, match="a.png/c.png/matches"):
        stored[1]
    with pytest.raises(StoreError, match="c.png/descriptors"):
        reader[2]


def test_matching_and_verification_stream_over_the_pairs(tmp_path: Path):
    """Matching writes each pair as it is matched (its result reads them back from the store); verification reads
    each pair in the job that verifies it."""
    rng = np.random.default_rng(3)
    names = [f"{k}.png" for k in range(6)]
    base = rng.random((400, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    features = []
    for _ in names:  # the same scene seen again: every keypoint matches its twin in every other image
        f = _features(rng, 400, dims=64)
        f.descriptors = base + 1e-4 * rng.standard_normal(base.shape).astype(np.float32)
        f.descriptors /= np.linalg.norm(f.descriptors, axis=1, keepdims=True)
        features.append(f)
    pairs = np.array([(i, j) for i in range(6) for j in range(i + 1, 6)])
    with MatchStore(tmp_path / "matches.h5", "k", names) as store:
        raw = match_pairs(features, pairs, MatchingConfig(matcher="nn-ratio"), progress=False, store=store)
    assert isinstance(raw.matches, StoredArrays) and isinstance(raw.scores, StoredArrays)
    assert [len(m) for m in raw.matches] == [400] * len(pairs)
    verified = verify_matches(features, raw, None, MatchingConfig(verification="none"), progress=False)
    assert verified.num_pairs == len(pairs) and verified.num_raw.tolist() == [400] * len(pairs)


# ---------------------------------------------------------------------------------------------------------------
# Resume after an interruption


def test_an_interrupted_extraction_resumes_with_the_images_it_had(tmp_path: Path, monkeypatch):
    real = features_module.extract_image
    calls: list[int] = []

    def interrupted_after_two(image, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(image, *args, **kwargs)

    monkeypatch.setattr(features_module, "extract_image", interrupted_after_two)
    path = tmp_path / "features.h5"
    with pytest.raises(KeyboardInterrupt), FeatureStore(path, "k") as store:
        extract_features(TEMPLE / "images", TEMPLE_NAMES, SIFT, progress=False, store=store)
    with h5py.File(path, "r") as handle:
        assert sorted(handle) == TEMPLE_NAMES[:2]

    calls.clear()
    monkeypatch.setattr(features_module, "extract_image", lambda image, *a, **k: (calls.append(1), real(image, *a, **k))[1])
    with FeatureStore(path, "k") as store:
        resumed = extract_features(TEMPLE / "images", TEMPLE_NAMES, SIFT, progress=False, store=store)
    assert len(calls) == 2, "only the images not stored before the interruption are extracted"
    fresh = extract_features(TEMPLE / "images", TEMPLE_NAMES, SIFT, progress=False)
    assert all(_equal(a, b) for a, b in zip(resumed, fresh))


def test_an_interrupted_matching_resumes_with_the_pairs_it_had(tmp_path: Path, monkeypatch):
    features = extract_features(TEMPLE / "images", TEMPLE_NAMES, SIFT, progress=False)
    pairs = np.array([(i, j) for i in range(4) for j in range(i + 1, 4)])
    config = MatchingConfig(matcher="nn-ratio")
    real = matching_module.mutual_nn_ratio
    calls: list[int] = []

    def interrupted_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(matching_module, "mutual_nn_ratio", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt), MatchStore(tmp_path / "matches.h5", "k", TEMPLE_NAMES) as store:
        match_pairs(features, pairs, config, progress=False, store=store)
    calls.clear()
    monkeypatch.setattr(matching_module, "mutual_nn_ratio", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with MatchStore(tmp_path / "matches.h5", "k", TEMPLE_NAMES) as store:
        resumed = match_pairs(features, pairs, config, progress=False, store=store)
    assert len(calls) == len(pairs) - 3
    fresh = match_pairs(features, pairs, config, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.matches, fresh.matches))


# ---------------------------------------------------------------------------------------------------------------
# Damaged or foreign files


@pytest.mark.parametrize("planted", ["garbage", "pickle", "other_key", "other_version"])
def test_a_damaged_or_foreign_store_is_recomputed_with_a_warning(tmp_path: Path, caplog, planted: str):
    path = tmp_path / "features.h5"
    marker = tmp_path / "marker"
    if planted == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif planted == "pickle":
        path.write_bytes(pickle.dumps(_Exploit(marker)))
    else:
        with FeatureStore(path, "another key" if planted == "other_key" else "k") as store:
            store.put(TEMPLE_NAMES[0], _features(np.random.default_rng(0), 5))
        if planted == "other_version":
            with h5py.File(path, "a") as handle:
                handle.attrs["version"] = 99
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"), FeatureStore(path, "k") as store:
        assert not store.done(TEMPLE_NAMES[0])
        features = extract_features(TEMPLE / "images", TEMPLE_NAMES[:2], SIFT, progress=False, store=store)
    assert not marker.exists()
    assert f"store {path}" in caplog.text and "recomputing it" in caplog.text
    assert features.num_keypoints() == [f.num_keypoints for f in features] and len(features) == 2


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_damaged_group_is_recomputed_and_its_stage_entry_too(tmp_path: Path, caplog):
    """A run's cache: the features store damaged inside one image's data. The rerun warns, re-extracts that image
    only, and gives the same model."""
    images = tmp_path / "images"
    images.mkdir()
    for name in TEMPLE_NAMES:
        (images / name).write_bytes((TEMPLE / "images" / name).read_bytes())
    predictions = load_predictions(TEMPLE / "prior_vggt_sim.npz").subset(TEMPLE_NAMES)
    config = config_from_dict({"features": {"extractor": "sift", "max_keypoints": 512, "resize_max": 640}})
    out = tmp_path / "out"
    first = pipeline.run(images, predictions=predictions, output=out, config=config, progress=False)
    (store,) = (out / "cache").glob("features-*.h5")
    _flip_data(store, f"{TEMPLE_NAMES[1]}/descriptors")
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        second = pipeline.run(images, predictions=predictions, output=out, config=config, overwrite=True,
                              progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignoring unreadable cache entry" in m and "features-" in m for m in messages), messages
    assert any(f"recomputing {TEMPLE_NAMES[1]}" in m for m in messages), messages
    assert "features" not in second.summary.cached_stages and "verification" in second.summary.cached_stages
    assert second.summary.num_points == first.summary.num_points
    assert second.summary.num_registered == first.summary.num_registered == 4
