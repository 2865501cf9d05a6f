"""Our VGGT computes the official VGGT's function: outputs of random-weight parity fixtures.

The fixtures (see `fixtures/vggt_parity/NOTES.md`) were produced by the official implementation
(facebookresearch/vggt @ a288dd0f) with small random "strong" weights, so a wrong operation shows up as a
large difference. Each tiny model is built from the fixture's config, its state dict loaded strictly, and
every stored output compared in float32 on CPU with |ours - official| <= 1e-4 + 1e-4 |official|.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vggt_sfm.model import VGGT, VGGTConfig, pose_encoding_to_extrinsics_intrinsics
from vggt_sfm.model.layers import block as block_module

FIXTURES = Path(__file__).parent / "fixtures" / "vggt_parity"
SHARED_PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "vggt_parity"

CASES = {
    "dino_2x70x98": (FIXTURES, "tiny_dino_strong_s0", "2x70x98"),
    "conv_2x70x98": (FIXTURES, "tiny_conv_strong_s1", "2x70x98"),
    "dino_track_2x182x252": (FIXTURES, "tiny_dino_track_strong_s2", "2x182x252"),
    # 28 MB, read from the shared folder: three 518x518 frames (the stored DINO position embedding, no resizing).
    "dino_3x518x518": (SHARED_PARITY, "tiny_dino_strong_s0", "3x518x518"),
}
RTOL = ATOL = 1e-4


def load_case(
    case: str, on_meta: bool = False, **overrides
) -> tuple[VGGT, dict[str, np.ndarray], torch.Tensor | None]:
    folder, model_name, size = CASES[case]
    data_path = folder / f"{model_name}__in_{size}.npz"
    if not data_path.exists():
        # Only the 518x518 case reads the shared folder: 28 MB, too large to ship in the repository.
        pytest.skip(f"needs {data_path.name} of the shared VGGT parity set (shared/vggt_parity, not shipped)")
    data = dict(np.load(data_path))
    config = VGGTConfig.from_meta(str(data["meta_json"]))
    with torch.device("meta" if on_meta else "cpu"):
        model = VGGT(config, **overrides).eval()
    state_dict = torch.load(FIXTURES / f"{model_name}.pt", weights_only=True)
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    queries = torch.from_numpy(np.load(FIXTURES / "qp_3.npy")).float() if model.config.enable_track else None
    return model, data, queries


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(model, fixture arrays, our outputs keyed like the fixture) for one fixture, computed once."""
    torch.manual_seed(0)
    model, data, queries = load_case(request.param)
    images = torch.from_numpy(data["images"])
    # The tiny models' DPT heads read every layer, so the forward pass keeps all of them: capture them.
    captured = []
    model.aggregator.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    with torch.inference_mode():
        out = model(images, query_points=queries)
    (tokens,) = captured
    extrinsic, intrinsic = pose_encoding_to_extrinsics_intrinsics(out["pose_enc"], images.shape[-2:])
    ours = {
        "pose_enc": out["pose_enc"],
        "pose_enc_list": torch.stack(out["pose_enc_list"]),
        "depth": out["depth"],
        "depth_conf": out["depth_conf"],
        "world_points": out["world_points"],
        "world_points_conf": out["world_points_conf"],
        "extrinsic": extrinsic,
        "intrinsic": intrinsic,
        **{f"tokens_layer{i:02d}": t for i, t in enumerate(tokens)},
    }
    if queries is not None:
        ours.update(track=out["track"], vis=out["vis"], track_conf=out["conf"])
    return model, data, ours


def assert_matches(name: str, ours: torch.Tensor, official: np.ndarray) -> None:
    ours = ours.detach().double().numpy()
    assert ours.shape == official.shape, f"{name}: shape {ours.shape} != {official.shape}"
    err = np.abs(ours - official)
    bad = err > ATOL + RTOL * np.abs(official)
    assert not bad.any(), f"{name}: {bad.sum()} values off, max abs error {err.max():.3g}"


def test_every_stored_output_matches(case):
    _, data, ours = case
    expected = [k for k in data if k not in ("images", "meta_json", "patch_start_idx")]
    assert set(expected) <= set(ours), f"no counterpart for {set(expected) - set(ours)}"
    for name in expected:
        assert_matches(name, ours[name], data[name])


def test_patch_start_index(case):
    model, data, _ = case
    if "patch_start_idx" in data:
        assert model.aggregator.patch_start_idx == int(data["patch_start_idx"])


def test_meta_built_model_chunked_computation_and_head_subset_give_the_same_predictions(monkeypatch):
    """Built on the meta device and loaded with assign=True (as the weight loader does), one frame per
    DPT pass, feed-forward layers over 48 tokens at a time, camera+depth only: the same numbers, and only
    the needed layers are kept."""
    monkeypatch.setattr(block_module, "MLP_CHUNK_TOKENS", 48)
    model, data, _ = load_case("dino_2x70x98", on_meta=True, dpt_frames_chunk_size=1)
    images = torch.from_numpy(data["images"])
    with torch.inference_mode():
        out = model(images, heads=("camera", "depth"))
        kept, _ = model.aggregator(images, keep_layers=[model.config.depth - 1])
    assert {"pose_enc", "depth", "depth_conf"} <= set(out) and "world_points" not in out
    for name in ("pose_enc", "depth", "depth_conf"):
        assert_matches(name, out[name], data[name])
    assert [t is not None for t in kept] == [False] * (model.config.depth - 1) + [True]


def test_unbatched_input_and_bf16_autocast():
    """[S, 3, H, W] input works; under bf16 autocast the heads still return float32 close to fp32."""
    model, data, _ = load_case("dino_2x70x98")
    images = torch.from_numpy(data["images"])[0]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, heads=("camera", "depth"))
    assert out["depth"].dtype == torch.float32 and out["pose_enc"].dtype == torch.float32
    depth_err = (out["depth"].numpy() - data["depth"]) / data["depth"]
    assert np.abs(depth_err).max() < 0.05
    assert np.abs(out["pose_enc"].numpy() - data["pose_enc"]).max() < 0.1
