"""Find and load VGGT checkpoints, safely and with about one copy of the weights in memory.

Where the weights come from, first match wins:
1. an explicit path (`--weights`): `model.pt` as published, a `.safetensors` file, or a folder holding one;
2. the `VGGT_SFM_WEIGHTS` environment variable (same forms);
3. the Hugging Face cache (`facebook/VGGT-1B`, then `facebook/VGGT-1B-Commercial`), looked up offline;
4. only when asked (`download=True`, `--download`): a download into that cache, with a progress bar.

Only tensors are read: safetensors, or `torch.load(weights_only=True)` memory-mapped. The model is built on
the meta device and the checkpoint's tensors are assigned to it, so no second set of weights is allocated.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UserError, param
from .vggt import HEADS, VGGT, VGGTConfig

logger = logging.getLogger(__name__)

ENV_VAR = "VGGT_SFM_WEIGHTS"
HF_REPOS = ("facebook/VGGT-1B", "facebook/VGGT-1B-Commercial")
CHECKPOINT_FILES = ("model.safetensors", "model.pt")
PUBLISHED_URL = "https://huggingface.co/facebook/VGGT-1B/resolve/main/model.pt"
_SHOWN = 3  # how many key names an error message lists


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring the environment at call time (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _checkpoint_in(folder: Path) -> Path | None:
    for name in CHECKPOINT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _resolve_given(path: Path, origin: str) -> Path:
    """A file, or the checkpoint inside a folder, given by the user (`origin` says how)."""
    path = path.expanduser()
    if path.is_dir():
        found = _checkpoint_in(path)
        if found is None:
            raise UserError(f"{origin} {path} is a folder without {' or '.join(CHECKPOINT_FILES)}; point it at the checkpoint file")
        return found
    if not path.is_file():
        raise UserError(f"{origin} {path} does not exist; point it at VGGT's model.pt or model.safetensors")
    return path


def find_cached_weights(cache_dir: Path | None = None) -> Path | None:
    """A VGGT checkpoint in the Hugging Face cache, found without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = hf_cache_dir() if cache_dir is None else Path(cache_dir)
    for repo in HF_REPOS:
        for name in CHECKPOINT_FILES:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        # A cache copied by hand may lack refs/main: take the newest snapshot that has a checkpoint.
        snapshots = cache_dir / f"models--{repo.replace('/', '--')}" / "snapshots"
        candidates = [c for c in (_checkpoint_in(s) for s in snapshots.glob("*") if s.is_dir()) if c is not None]
        if candidates:
            return max(candidates, key=lambda p: p.stat().st_mtime)
    return None


def download_weights(repo: str = HF_REPOS[0], cache_dir: Path | None = None) -> Path:
    """Download VGGT's checkpoint into the Hugging Face cache (progress bar from huggingface_hub)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError

    cache_dir = hf_cache_dir() if cache_dir is None else Path(cache_dir)
    last_error: Exception | None = None
    for name in CHECKPOINT_FILES:
        try:
            logger.warning("downloading %s/%s (about 5 GB) into %s", repo, name, cache_dir)
            return Path(hf_hub_download(repo, name, cache_dir=cache_dir))
        except LocalEntryNotFoundError:  # offline (no connection, or HF_HUB_OFFLINE=1)
            raise UserError(
                f"cannot reach the Hugging Face Hub to download {repo}; download {PUBLISHED_URL} (5 GB) on a "
                f"connected machine and pass it as {param('weights')} (or set {ENV_VAR}=PATH)"
            ) from None
        except EntryNotFoundError as error:
            last_error = error
        except GatedRepoError:
            raise UserError(
                f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and log in with `hf auth login`, "
                f"then run again with {param('download', True)}"
            ) from None
        except Exception as error:  # offline, DNS, proxy, disk full: all end the same way for the user
            raise UserError(
                f"could not download VGGT weights from {repo} ({type(error).__name__}: {error}); "
                f"download {PUBLISHED_URL} by hand and pass it as {param('weights')}"
            ) from None
    raise UserError(f"{repo} has none of {', '.join(CHECKPOINT_FILES)} ({last_error})")


def find_weights(weights: Path | str | None = None, download: bool = False) -> Path:
    """Where the VGGT checkpoint is: explicit path, $VGGT_SFM_WEIGHTS, the HF cache, or (if allowed) a download."""
    if weights is not None:
        return _resolve_given(Path(weights), param("weights"))
    if os.environ.get(ENV_VAR):
        return _resolve_given(Path(os.environ[ENV_VAR]), f"${ENV_VAR}=")
    cached = find_cached_weights()
    if cached is not None:
        return cached
    if download:
        return download_weights()
    raise UserError(
        f"no VGGT weights found: download {PUBLISHED_URL} (5 GB) and pass it as {param('weights')} "
        f"(or set {ENV_VAR}=PATH), or run again with {param('download', True)} to fetch it into {hf_cache_dir()}"
    )


def _sniff(path: Path) -> str:
    """'safetensors', 'torch-zip', 'torch-legacy' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) > 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def read_checkpoint(path: Path | str, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, read safely (no arbitrary unpickling), memory-mapped where possible.

    Keys starting with one of `skip_prefixes` are left out (and, for safetensors, never read).
    """
    path = Path(path)
    kind = _sniff(path)
    fix = f"download it again or point {param('weights')} at the right file"
    if path.stat().st_size == 0:
        raise UserError(f"weights file {path} is empty; {fix}")
    if kind == "unknown":
        raise UserError(f"{path} is not a checkpoint (neither a PyTorch .pt nor a .safetensors file); {fix}")
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                state: object = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip_prefixes)}
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path} holds Python objects besides tensors, which are not loaded for safety ({_first_line(error)}); "
            "use the published model.pt or a .safetensors file"
        ) from None
    except Exception as error:  # torch, zipfile and safetensors each raise their own kinds for a damaged file
        raise UserError(f"cannot read weights file {path} (truncated or damaged?): {_first_line(error)}; {fix}") from None
    state = _state_dict_of(state, path)
    return {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}


def _first_line(error: Exception) -> str:
    """The first sentence of an exception's message (library messages can run to paragraphs)."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def _state_dict_of(state: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap {'model': ...} / {'state_dict': ...} training checkpoints and check that values are tensors."""
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping) and len(state) <= 8:
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise UserError(f"{path} does not hold a state dict (found {type(state).__name__}); use VGGT's model.pt")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path}: entries {', '.join(map(str, not_tensors[:_SHOWN]))} are not tensors; this is not a model checkpoint")
    state = dict(state)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: Path | str) -> None:
    """Raise UserError naming what does not fit when `state` is not exactly the model's keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    known = len(state) - len(unexpected)

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")

    if known < len(state) / 2:
        raise UserError(
            f"{path} is not a VGGT checkpoint: only {known} of its {len(state)} tensors have VGGT's names "
            f"(it has e.g. {names(sorted(unexpected))})"
        )
    if missing:
        raise UserError(
            f"{path} lacks {len(missing)} of VGGT's {len(expected)} tensors, e.g. {names(missing)} "
            "(an incomplete file or another VGGT variant)"
        )
    if unexpected:
        raise UserError(f"{path} has {len(unexpected)} tensors VGGT does not have, e.g. {names(unexpected)} (another model?)")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{path}: {len(wrong)} tensors have the wrong shape, e.g. {k} is {tuple(state[k].shape)} "
            f"where VGGT has {tuple(expected[k])} (another model size?)"
        )
    not_float = [k for k in expected if not state[k].is_floating_point()]
    if not_float:
        raise UserError(f"{path}: {names(not_float)} are not floating-point tensors; this is not VGGT's checkpoint")


def load_model(
    weights: Path | str | None = None,
    download: bool = False,
    config: VGGTConfig | None = None,
    heads: Iterable[str] | None = None,
) -> VGGT:
    """Build VGGT (1B unless `config` says otherwise) and fill it from a checkpoint; eval mode, float32, no grad.

    `heads` (any of "camera", "depth", "point", "track"; default all four) are the heads the model gets: the
    checkpoint's other heads are skipped, and a checkpoint stripped of heads that are not asked for is
    accepted. Everything the model keeps must match the checkpoint exactly (keys and shapes).
    The model is created on the meta device and the checkpoint's tensors become its parameters, so peak memory
    is about one copy of the weights. Raises UserError when no checkpoint is found or it does not fit.
    """
    config = config or VGGTConfig()
    wanted = set(HEADS if heads is None else heads)
    unknown = wanted - set(HEADS)
    if unknown:
        raise UserError(f"unknown VGGT heads {', '.join(sorted(unknown))}; choose from {', '.join(HEADS)}")
    config = replace(config, **{f"enable_{h}": h in wanted for h in HEADS})
    skipped = tuple(f"{h}_head." for h in HEADS if h not in wanted)

    path = find_weights(weights, download)
    logger.info("loading VGGT weights from %s", path)
    state = read_checkpoint(path, skip_prefixes=skipped)
    with torch.device("meta"):
        model = VGGT(config)
    check_state_dict(state, {k: v.shape for k, v in model.state_dict().items()}, path)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()  # e.g. a checkpoint stored in bf16: computations are defined in fp32
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"VGGT tensors not filled by the checkpoint: {left_on_meta[:_SHOWN]}")
    # Without requires_grad, autocast keeps no low-precision copies of the weights between ops.
    return model.eval().requires_grad_(False)
