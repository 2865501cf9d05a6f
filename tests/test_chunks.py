"""Chunks of similar views (`vggt_sfm.chunks`) formed on real photos, and every bad chunk option refused.

The photos are the Middlebury temple ring (16 views around an object, `data/templeSR`), whose file names do not
follow the ring, and the fountain (`data/fountain`, 11 views of a facade) for a second scene. The image graph is
real: SIFT, VLAD retrieval, RANSAC-verified matches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import connected_components
from vggt_tiny import tiny_vggt

from vggt_sfm.chunks import check_chunk_options, core_size, default_chunk_overlap, form_chunks, plan_chunks
from vggt_sfm.cli import main
from vggt_sfm.config import apply_overrides, load_preset
from vggt_sfm.errors import UserError
from vggt_sfm.images import list_images
from vggt_sfm.predict import predict

DATA = Path(__file__).resolve().parents[1] / "data"
TEMPLE = DATA / "templeSR" / "images"
FOUNTAIN = DATA / "fountain" / "images"


@pytest.fixture(scope="module")
def temple_plan():
    return form_chunks(TEMPLE, list_images(TEMPLE), 8, 2, progress=False)


def _connected(num: int, edges) -> bool:
    graph = np.zeros((num, num), dtype=bool)
    for a, b, _ in edges:
        graph[a, b] = graph[b, a] = True
    return num == 1 or connected_components(graph, directed=False)[0] == 1


def test_chunks_cover_every_image_and_are_connected(temple_plan):
    plan = temple_plan
    names = list_images(TEMPLE)
    assert plan.names == names and len(plan.chunks) == 4  # 16 images, cores of 8 - 2x2
    assert sorted(n for core in plan.cores for n in core) == sorted(names)  # each image in exactly one core
    assert set().union(*map(set, plan.chunks)) == set(names)
    assert all(len(chunk) <= 8 and len(set(chunk)) == len(chunk) for chunk in plan.chunks)
    assert all(set(core) <= set(chunk) for core, chunk in zip(plan.cores, plan.chunks))
    assert plan.chunks[0][0] in plan.cores[0]  # the reference frame is one of the chunk's own images
    assert _connected(len(plan.chunks), plan.edges())
    assert plan.num_frames() == sum(len(chunk) for chunk in plan.chunks) <= 8 * len(plan.chunks)


def test_chunks_hold_views_of_one_part_of_the_scene_and_share_well_matched_frames(temple_plan):
    """Each core is a connected run of the ring (by verified matches), and every frame two chunks share is
    matched to other frames of each (VGGT sees it in context in both)."""
    plan, index = temple_plan, {name: i for i, name in enumerate(temple_plan.names)}
    matches = plan.matches
    for core in plan.cores:
        rows = [index[n] for n in core]
        assert connected_components(matches[np.ix_(rows, rows)] > 0, directed=False)[0] == 1, core
    for a, b, shared in plan.edges():
        assert len(shared) >= 1
        for name in shared:
            for chunk in (a, b):
                others = [index[n] for n in plan.chunks[chunk] if n != name]
                assert matches[index[name], others].max() >= 15, (name, chunk)


def test_shuffled_names_give_the_same_chunks(temple_plan, tmp_path):
    names = list_images(TEMPLE)
    shuffled = list(np.random.default_rng(0).permutation(len(names)))
    renamed = {name: f"view_{k:02d}.png" for name, k in zip(names, shuffled)}
    for name, new in renamed.items():
        shutil.copy(TEMPLE / name, tmp_path / new)
    plan = form_chunks(tmp_path, sorted(renamed.values()), 8, 2, progress=False)
    original = {new: name for name, new in renamed.items()}
    assert [[original[n] for n in chunk] for chunk in plan.chunks] == temple_plan.chunks
    assert [sorted(original[n] for n in core) for core in plan.cores] == [sorted(core) for core in temple_plan.cores]


def test_images_of_two_scenes_are_refused_naming_both_groups(tmp_path, caplog):
    for folder in (TEMPLE, FOUNTAIN):
        for path in sorted(folder.iterdir()):
            shutil.copy(path, tmp_path / path.name)
    output = tmp_path.parent / f"{tmp_path.name}_predictions.npz"
    model = tiny_vggt(enable_point=False, enable_track=False)
    with pytest.raises(UserError) as refused:
        predict(tmp_path, output=output, model=model, chunks=8, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "2 groups that share no verified matches" in message
    assert "group 1: 16 images (templeSR0001.png" in message and "group 2: 11 images (0000.jpg" in message
    assert "predict each group from a folder of its own" in message
    assert not output.exists()


def test_plan_on_a_synthetic_graph_closes_the_loop():
    """An orbit of 24 views, each matched to its two neighbours on each side: six chunks of 8 around it, and the
    chunk graph has a loop (more chunk pairs share frames than a tree has edges)."""
    num = 24
    names = [f"{i:02d}.png" for i in range(num)]
    weights = np.zeros((num, num))
    for i in range(num):
        for step, w in ((1, 200.0), (2, 80.0)):
            weights[i, (i + step) % num] = weights[(i + step) % num, i] = w
    plan = plan_chunks(names, weights, np.zeros((num, num)), 8, 2)
    assert len(plan.chunks) == 6 and core_size(8, 2) == 4
    assert all(len(chunk) <= 8 for chunk in plan.chunks)
    assert len(plan.edges()) >= len(plan.chunks) and _connected(6, plan.edges())
    for core in plan.cores:  # arcs of the orbit
        steps = np.diff(sorted(int(n[:2]) for n in core))
        assert (steps == 1).sum() >= len(core) - 2, core
    # An image that matches nothing is kept, in a core with the images it looks most like.
    weights[5, :] = weights[:, 5] = 0
    ring = np.abs(np.arange(num)[:, None] - np.arange(num)[None, :])
    looks = 0.9 - 0.05 * np.minimum(ring, num - ring)  # views look alike as near as they are on the orbit
    plan = plan_chunks(names, weights, looks, 8, 2)
    core = next(core for core in plan.cores if "05.png" in core)
    assert plan.attached == ["05.png"] and {"03.png", "04.png", "06.png", "07.png"} & set(core)
    assert all(len(core) <= core_size(8, 2) for core in plan.cores)


def test_bad_chunk_options_are_one_line_each(tmp_path, monkeypatch):
    assert default_chunk_overlap(2) == 1 and default_chunk_overlap(10) == 2 and default_chunk_overlap(100) == 8
    assert check_chunk_options(10, 0) == 2
    for size, overlap, expected in ((1, 0, r"at least 2 frames, got `chunks=1`"), (4, 4, r"between 1 and .* \(3\), got `chunk_overlap=4`")):
        with pytest.raises(UserError, match=expected):
            check_chunk_options(size, overlap)
    folder = tmp_path / "im"
    folder.mkdir()
    for name in list_images(TEMPLE)[:4]:
        shutil.copy(TEMPLE / name, folder / name)
    model = tiny_vggt(enable_point=False, enable_track=False)
    with pytest.raises(UserError, match="choose one"):
        predict(folder, model=model, window=2, chunks=2)
    with pytest.raises(UserError, match="predicting in chunks needs the depth head"):
        predict(folder, model=model, chunks=2, heads=("camera",))
    # A chunk larger than fits: refused before any work, saying how many fit.
    import vggt_sfm.predict as predict_module
    from vggt_sfm.model import VGGTConfig

    estimate = predict_module.estimate_memory(VGGTConfig(), (518, 392), ("camera", "depth"), torch.device("cpu"))
    room = estimate.needed(2) + estimate.per_frame // 2
    monkeypatch.setattr(predict_module, "available_memory", lambda device: int(room / predict_module.USABLE_FRACTION) + 1)
    with pytest.raises(UserError, match=r"a chunk of 3 frames needs about .* GB .* about 2 frames fit; use a smaller `chunks` \(at most 2\)"):
        predict(folder, weights=tmp_path / "never-read.pt", chunks=3)
    # The configuration and the command line.
    for key, value, expected in (("chunks", 1, "predict.chunks must be 0"), ("chunk_overlap", -1, "must be >= 0")):
        with pytest.raises(UserError, match=expected):
            apply_overrides(load_preset("default"), [(["predict", key], value)])
    with pytest.raises(UserError, match="predict.window .* and predict.chunks .* choose|set one of them to 0"):
        apply_overrides(load_preset("default"), [(["predict", "window"], 4), (["predict", "chunks"], 4)])
    preset = tmp_path / "chunked.toml"
    preset.write_text('extends = "default"\n[predict]\nchunks = 24\nchunk_overlap = 4\n')
    assert (load_preset(preset).predict.chunks, load_preset(preset).predict.chunk_overlap) == (24, 4)
    with pytest.raises(UserError, match=r"predict.chunk_overlap \(4\) must be below predict.chunks \(4\)"):
        apply_overrides(load_preset(preset), [(["predict", "chunks"], 4)])
    # Overrides are checked together: windows instead of the preset's chunks, smaller chunks with a smaller overlap.
    windowed = apply_overrides(load_preset(preset), [(["predict", "window"], 8), (["predict", "chunks"], 0)])
    assert (windowed.predict.window, windowed.predict.chunks) == (8, 0)
    smaller = apply_overrides(load_preset(preset), [(["predict", "chunks"], 4), (["predict", "chunk_overlap"], 1)])
    assert (smaller.predict.chunks, smaller.predict.chunk_overlap) == (4, 1)


def test_the_command_line_names_its_options(tmp_path, capsys):
    folder = tmp_path / "im"
    folder.mkdir()
    for name in list_images(TEMPLE)[:3]:
        shutil.copy(TEMPLE / name, folder / name)
    for options, expected in (
        (["--chunks", "1"], "a chunk needs at least 2 frames, got --chunks 1"),
        (["--chunks", "4", "--chunk-overlap", "4"], "got --chunk-overlap 4"),
        (["--chunks", "4", "--window", "4"], "--window (sequences, in name order) and --chunks (unordered collections)"),
    ):
        code = main(["predict", "--images", str(folder), "--output", str(tmp_path / "p.npz"), "--weights", str(tmp_path / "w.pt"), *options])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "p.npz").exists()
