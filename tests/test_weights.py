"""Finding and loading VGGT checkpoints: real files in every supported form, and every kind of wrong file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from vggt_tiny import TINY, tiny_vggt

from vggt_sfm.errors import UserError
from vggt_sfm.model import VGGT, VGGTConfig
from vggt_sfm.model.weights import (
    ENV_VAR,
    check_state_dict,
    find_weights,
    load_model,
    read_checkpoint,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vggt_parity"


class NotATensor:  # pickled into a checkpoint, it must be refused by the safe loader
    pass


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No weights from the environment: an empty HF cache, no VGGT_SFM_WEIGHTS, and no way online."""
    for name in (ENV_VAR, "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def reference():
    """A seeded tiny VGGT, its state dict, and its outputs on two small frames."""
    model = tiny_vggt(seed=3)
    images = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model(images, heads=("camera", "depth"))
    return model.state_dict(), images, out


def _assert_same_model(model: VGGT, reference, forward: bool = False) -> None:
    state, images, out = reference
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value), key
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    if not forward:
        return
    with torch.inference_mode():
        again = model(images, heads=("camera", "depth"))
    assert torch.equal(again["pose_enc"], out["pose_enc"])
    assert torch.equal(again["depth"], out["depth"])


def test_pt_and_safetensors_load_identically(tmp_path, reference):
    state = reference[0]
    torch.save(state, tmp_path / "model.pt")
    save_file(state, tmp_path / "model.safetensors")
    _assert_same_model(load_model(tmp_path / "model.pt", config=TINY), reference, forward=True)
    _assert_same_model(load_model(tmp_path / "model.safetensors", config=TINY), reference)


def test_folder_env_var_and_wrapped_checkpoint(tmp_path, monkeypatch, reference):
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save({"model": reference[0], "epoch": 3}, folder / "model.pt")  # a training-style checkpoint
    assert find_weights(folder) == folder / "model.pt"
    monkeypatch.setenv(ENV_VAR, str(folder))
    assert find_weights() == folder / "model.pt"
    _assert_same_model(load_model(config=TINY), reference)
    # An explicit path wins over the environment.
    other = tmp_path / "other.safetensors"
    save_file(reference[0], other)
    assert find_weights(other) == other
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere.pt"))
    with pytest.raises(UserError, match=f"{ENV_VAR}.*nowhere.pt.*does not exist"):
        find_weights()


@pytest.mark.parametrize("repo", ["VGGT-1B", "VGGT-1B-Commercial"])
def test_hugging_face_cache(clean_env, reference, repo):
    snapshot = clean_env / f"models--facebook--{repo}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(reference[0], snapshot / "model.safetensors")
    assert find_weights() == snapshot / "model.safetensors"
    _assert_same_model(load_model(config=TINY), reference)
    # With refs/main (as huggingface_hub writes it), the referenced snapshot is the one used.
    newer = snapshot.parent / "fedc9876"
    newer.mkdir()
    torch.save(reference[0], newer / "model.pt")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    assert find_weights() == snapshot / "model.safetensors"


def test_offline_without_weights_says_where_to_put_them(clean_env):
    with pytest.raises(UserError) as info:
        find_weights()
    message = str(info.value)
    assert "\n" not in message
    assert "https://huggingface.co/facebook/VGGT-1B/resolve/main/model.pt" in message
    assert "`weights`" in message and ENV_VAR in message and "`download=True`" in message and str(clean_env) in message
    # Asked to download while offline: a clear message, not a traceback.
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub"):
        find_weights(download=True)
    with pytest.raises(UserError, match="does not exist"):
        find_weights(clean_env / "model.pt")
    with pytest.raises(UserError, match="folder without"):
        find_weights(clean_env)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, reference, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(reference[0], path)
    else:
        save_file(reference[0], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        load_model(path, config=TINY)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "model.pt"
    text.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 5030000000\n")
    with pytest.raises(UserError, match="not a checkpoint"):
        read_checkpoint(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_checkpoint(empty)
    pickled = tmp_path / "objects.pt"
    torch.save({"weight": torch.zeros(2), "thing": NotATensor()}, pickled)
    with pytest.raises(UserError, match="Python objects besides tensors"):
        read_checkpoint(pickled)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(UserError, match="does not hold a state dict"):
        read_checkpoint(tensor_only)


def test_wrong_keys_and_shapes_are_named(tmp_path, reference):
    state = dict(reference[0])
    keys = list(state)

    def attempt(bad: dict, name: str) -> str:
        path = tmp_path / name
        torch.save(bad, path)
        with pytest.raises(UserError) as info:
            load_model(path, config=TINY, heads=("camera", "depth", "point", "track"))
        return str(info.value)

    missing = {k: v for k, v in state.items() if k not in keys[5:8]}
    message = attempt(missing, "missing.pt")
    assert "lacks 3 of" in message and keys[5] in message

    extra = dict(state, **{"aggregator.extra_token": torch.zeros(3)})
    assert "aggregator.extra_token" in attempt(extra, "extra.pt")

    shape_key = "aggregator.camera_token"
    wrong = dict(state, **{shape_key: torch.zeros(1, 2, 1, 48)})
    message = attempt(wrong, "shape.pt")
    assert shape_key in message and "(1, 2, 1, 48)" in message and "(1, 2, 1, 32)" in message

    other = {f"layer{i}.weight": torch.zeros(4, 4) for i in range(20)}
    assert "is not a VGGT checkpoint" in attempt(other, "resnet.pt")


def test_heads_subset_and_stripped_checkpoint(tmp_path, reference):
    state = reference[0]
    stripped = {k: v for k, v in state.items() if not k.startswith(("point_head.", "track_head."))}
    path = tmp_path / "camera_depth.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in stripped.items()}, path)  # stored in bf16, like some repacks
    model = load_model(path, config=TINY, heads=("camera", "depth"))
    assert model.enabled_heads == ("camera", "depth")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    key = "depth_head.scratch.output_conv2.0.weight"
    assert torch.equal(model.state_dict()[key], state[key].to(torch.bfloat16).float())
    # Asking for a head the file does not have names the missing tensors.
    with pytest.raises(UserError, match="lacks .* point_head"):
        load_model(path, config=TINY, heads=("camera", "depth", "point"))
    # A full checkpoint loads into a camera+depth model without the other heads' tensors.
    full = tmp_path / "full.pt"
    torch.save(state, full)
    small = load_model(full, config=TINY, heads=("camera", "depth"))
    assert small.point_head is None and small.track_head is None


def test_published_checkpoint_layout_is_accepted():
    """The released VGGT-1B's 1797 keys and shapes pass the strict check against VGGT() built on meta."""
    keys_file = FIXTURES / "vggt1b_state_dict_keys.txt"
    shapes = {}
    for line in keys_file.read_text().splitlines():
        name, shape, _ = line.split("\t")
        shapes[name] = torch.Size(eval(shape))  # "(1, 2, 1, 1024)"
    with torch.device("meta"):
        model = VGGT()
        state = {k: torch.empty(s) for k, s in shapes.items()}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(state, expected, keys_file)
    model.load_state_dict(state, strict=True, assign=True)
    assert len(shapes) == 1797


def test_official_tiny_checkpoint_reproduces_official_outputs():
    """A state dict saved by the official implementation loads and gives the official outputs."""
    data = np.load(FIXTURES / "tiny_dino_strong_s0__in_2x70x98.npz")
    config = VGGTConfig.from_meta(str(data["meta_json"]))
    model = load_model(FIXTURES / "tiny_dino_strong_s0.pt", config=config, heads=("camera", "depth", "point"))
    with torch.inference_mode():
        out = model(torch.from_numpy(data["images"]), heads=("camera", "depth"))
    np.testing.assert_allclose(out["pose_enc"].numpy(), data["pose_enc"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["depth"].numpy(), data["depth"], rtol=1e-4, atol=1e-4)
