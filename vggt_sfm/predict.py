"""Run VGGT on a folder of images and write the predictions file.

`predict` reads and checks the images, preprocesses them exactly as the official loader, estimates the memory
the run needs and refuses before starting when the frames will not fit, runs the model once over all frames
under `torch.inference_mode()`, decodes the cameras at the prediction-grid size and returns (and optionally
saves) a `Predictions`.

Precision: on CUDA the aggregator runs under bf16 autocast (fp16 on GPUs older than compute capability 8),
on CPU in fp32; `dtype="bfloat16"` opts into bf16 autocast on CPU too. The heads always run in fp32 (the model
turns autocast off for them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, param
from .images import list_images, scan_images
from .log import progress as log_progress
from .predictions import Predictions, save_predictions, vggt_grid_from_image

logger = logging.getLogger(__name__)

HEAD_NAMES = {"camera": "camera", "cameras": "camera", "depth": "depth", "point": "point", "points": "point",
              "world_points": "point"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Peak working memory of one forward pass beyond the weights, measured on CPU in float32 (VGGT-1B widths,
# 518x518 frames, 1 to 6 frames) and rounded up: the aggregator needs about this many floats per token and
# channel of each frame (attention/MLP temporaries plus the kept layers), a DPT head about this many floats per
# pixel of each frame of the chunk it decodes, and a fixed amount for everything else.
AGGREGATOR_FLOATS_PER_TOKEN_CHANNEL = 18
DPT_FLOATS_PER_PIXEL = 160
FIXED_BYTES = 256 * 2**20
USABLE_FRACTION = 0.9  # of the memory reported free: leave room for the allocator and the rest of the system


@dataclass
class MemoryEstimate:
    """What a VGGT run needs and what the device has, in bytes."""

    weights: int
    per_frame: int  # aggregator working memory and kept outputs of one frame
    fixed: int  # independent of the number of frames
    dpt_per_frame: int  # a DPT head's working memory for one frame of the chunk it decodes
    dpt_chunk: int  # frames a DPT head decodes at once
    available: int | None  # None: unknown (no check)
    # Output maps of one frame held in the same memory until all windows are joined (on CPU; a GPU hands them to
    # the host after each window).
    maps_per_frame: int = 0

    def needed(self, num_frames: int, total_frames: int | None = None) -> int:
        """Bytes for one pass over `num_frames` frames; with `total_frames`, windows of that many over all of
        them (the other frames' maps are kept, and copied once when the windows are joined)."""
        chunk = min(num_frames, self.dpt_chunk)
        pass_bytes = self.weights + self.fixed + num_frames * self.per_frame + chunk * self.dpt_per_frame
        others = max((total_frames or num_frames) - num_frames, 0)
        return pass_bytes + 2 * others * self.maps_per_frame

    def max_frames(self) -> int | None:
        """How many frames fit in the usable memory, or None when the free memory is unknown."""
        if self.available is None:
            return None
        room = int(self.available * USABLE_FRACTION) - self.weights - self.fixed
        full_chunks = (room - self.dpt_chunk * self.dpt_per_frame) // self.per_frame
        if full_chunks >= self.dpt_chunk:
            return int(full_chunks)
        return max(int(room // (self.per_frame + self.dpt_per_frame)), 0)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; a named device must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but PyTorch sees no CUDA GPU here; use {param('device', 'cpu')}")
    if resolved.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported; use auto, cpu or cuda")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Precision of the aggregator: 'auto' -> bf16 on CUDA (fp16 before compute capability 8), fp32 on CPU."""
    if str(dtype) == "auto":
        if device.type != "cuda":
            return torch.float32
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif str(dtype).lower() in DTYPES:
        resolved = DTYPES[str(dtype).lower()]
    else:
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if resolved == torch.float16 and device.type != "cuda":
        raise UserError("float16 is for CUDA GPUs; on CPU use float32 (default) or bfloat16")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    if resolved == torch.bfloat16 and device.type == "cpu" and _cpu_bf16_support() is False:
        logger.warning(
            "this CPU has no native bfloat16 instructions (avx512_bf16 / amx_bf16): bfloat16 will be slower "
            "than float32 here (about 5x on an AVX2 CPU)"
        )
    return resolved


def _cpu_bf16_support() -> bool | None:
    """Whether the CPU has bf16 dot-product instructions; None when unknown (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return None


def parse_heads(heads: Iterable[str]) -> tuple[str, ...]:
    """The model heads to run, in VGGT's names; the camera head always runs (the file needs cameras)."""
    wanted = {"camera"}
    for name in heads:
        key = name.strip().lower()
        if key in ("track", "tracks"):
            raise UserError(
                "the track head is not run by `predict`: the predictions file has no tracks "
                f"(vggt-sfm matches features instead); use {param('heads', 'camera,depth[,point]')}"
            )
        if key not in HEAD_NAMES:
            raise UserError(f"unknown head {name!r}; choose from camera, depth, point")
        wanted.add(HEAD_NAMES[key])
    return tuple(h for h in ("camera", "depth", "point") if h in wanted)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on `device` now (host RAM within any cgroup limit, or free GPU memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:  # a container's limit can be far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max" and free is not None:
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def estimate_memory(
    config: object,
    grid_size: tuple[int, int],
    heads: tuple[str, ...],
    device: torch.device,
    weights_loaded: bool = False,
) -> MemoryEstimate:
    """Memory of a VGGT run on `device` for frames of `grid_size` (width, height); see the constants above."""
    from .model import VGGT

    with torch.device("meta"):
        skeleton = VGGT(config, **{f"enable_{h}": h in heads for h in ("camera", "depth", "point", "track")})
    weights = 0 if weights_loaded else sum(p.numel() * 4 for p in skeleton.parameters())
    width, height = grid_size
    patch = config.patch_size
    tokens = 1 + config.num_register_tokens + (height // patch) * (width // patch)
    per_frame = AGGREGATOR_FLOATS_PER_TOKEN_CHANNEL * tokens * config.embed_dim * 4
    dpt_per_frame = 0
    maps_per_frame = 0
    if "depth" in heads or "point" in heads:
        dpt_per_frame = DPT_FLOATS_PER_PIXEL * width * height * 4
        per_frame += 4 * 4 * width * height  # the depth/point maps and their confidences kept per frame
        maps_per_frame = 4 * width * height * (2 * ("depth" in heads) + 4 * ("point" in heads))
    return MemoryEstimate(
        weights=weights,
        per_frame=per_frame,
        fixed=FIXED_BYTES,
        dpt_per_frame=dpt_per_frame,
        dpt_chunk=int(config.dpt_frames_chunk_size) if config.dpt_frames_chunk_size else 1 << 30,  # none: all at once
        available=available_memory(device),
        maps_per_frame=maps_per_frame if device.type == "cpu" else 0,
    )


def _check_fits(
    estimate: MemoryEstimate, num_frames: int, device: torch.device, max_frames: int | None, total_frames: int
) -> None:
    """Refuse (UserError) when `total_frames` exceed `max_frames`, or when passes over `num_frames` frames (windows
    when fewer than `total_frames`) exceed the free memory."""
    gb = 2.0**30
    if max_frames is not None:
        if total_frames > max_frames:
            raise UserError(f"{total_frames} images but at most {max_frames} frames are allowed (max_frames); pass fewer images")
        return
    fit = estimate.max_frames()
    if fit is None:
        return
    windowed = num_frames < total_frames
    gpu_hint = " or use a GPU" if device.type == "cpu" else ""
    if num_frames > fit:
        what = f"a window of {num_frames} frames needs" if windowed else f"{num_frames} frames need"
        hint = f"; use a smaller {param('window')} (at most {fit})" if windowed else "; pass fewer images"
        if not windowed and fit >= 2:
            hint += f" or predict in overlapping windows ({param('window', fit)})"
        raise UserError(
            f"{what} about {estimate.needed(num_frames) / gb:.1f} GB for VGGT on {device}, "
            f"but {estimate.available / gb:.1f} GB are free: about {fit} frames fit{hint}{gpu_hint}"
        )
    needed = estimate.needed(num_frames, total_frames)
    if needed > estimate.available * USABLE_FRACTION:
        raise UserError(
            f"windows of {num_frames} frames over {total_frames} images need about {needed / gb:.1f} GB on {device} "
            f"(the depth maps of every frame are kept), but {estimate.available / gb:.1f} GB are free; "
            f"pass fewer images{gpu_hint}"
        )
    logger.info(
        "VGGT on %d frames needs about %.1f GB of %.1f GB free on %s (up to about %d frames fit in one pass)",
        total_frames, needed / gb, estimate.available / gb, device, fit,
    )


def run_vggt(
    model: torch.nn.Module,
    images: torch.Tensor,
    heads: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, np.ndarray]:
    """One forward pass over all frames [S,3,H,W]; returns numpy arrays without the batch axis.

    The aggregator runs under autocast when `dtype` is not float32; the model keeps its heads in float32.
    """
    from .model import pose_encoding_to_extrinsics_intrinsics

    height, width = images.shape[-2:]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(images.to(device), heads=heads)
    extrinsic, intrinsic = pose_encoding_to_extrinsics_intrinsics(out["pose_enc"][0].float(), (height, width))
    arrays = {"extrinsic": extrinsic.double().cpu().numpy(), "intrinsic": intrinsic.double().cpu().numpy()}
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        if key in out:
            value = out[key][0].float().cpu().numpy()
            arrays[key] = value[..., 0] if key == "depth" else value
    return arrays


def _check_finite(arrays: dict[str, np.ndarray], names: list[str]) -> None:
    """Refuse to write NaN/inf (a degenerate field of view gives an infinite focal length)."""
    for key, value in arrays.items():
        bad = ~np.isfinite(value.reshape(len(names), -1)).all(axis=1)
        if bad.any():
            frames = [names[i] for i in np.flatnonzero(bad)[:3]]
            raise UserError(
                f"VGGT predicted non-finite {key} for {int(bad.sum())} frame(s), e.g. {', '.join(frames)} "
                "(are the weights a trained VGGT checkpoint?)"
            )


def predict(
    images_dir: Path | str,
    output: Path | str | None = None,
    weights: Path | str | None = None,
    download: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    preprocess: str = "crop",
    heads: Iterable[str] = ("camera", "depth"),
    max_frames: int | None = None,
    model: torch.nn.Module | None = None,
    progress: bool = True,
    window: int = 0,
    window_overlap: int = 0,
) -> Predictions:
    """VGGT predictions (cameras, depth; point maps on request) for every readable image of `images_dir`.

    Frames are the images in sorted name order; unreadable images are skipped with a warning. `weights` and
    `download` choose the checkpoint (see `vggt_sfm.model.weights`); `model` passes a ready VGGT instead.
    All frames go through one pass, unless `window` > 0: then VGGT runs on windows of that many consecutive
    frames, consecutive windows sharing `window_overlap` frames (0: a quarter of the window), and the windows
    are chained into one frame by their shared depth (`vggt_sfm.windows`; needs the depth head).
    Refuses (UserError) before running when the frames (or a window) will not fit in memory, or more than
    `max_frames` are given. With `output`, the predictions file is also written there.
    """
    from .model import VGGTConfig
    from .model.preprocess import preprocess_images
    from .model.weights import load_model
    from .windows import chain_windows, default_overlap, window_ranges

    images_dir = Path(images_dir)
    run_heads = parse_heads(heads)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if window and "depth" not in run_heads:
        raise UserError(f"predicting in windows needs the depth head (windows are aligned by their depth); add depth to {param('heads')}")
    infos = scan_images(images_dir, list_images(images_dir), min_images=1)
    names = [info.name for info in infos]
    _, grid_size = vggt_grid_from_image([(info.width, info.height) for info in infos], preprocess)
    ranges = [(0, len(names))]
    if window:
        ranges = window_ranges(len(names), window, window_overlap or default_overlap(window))

    config = getattr(model, "config", None) or VGGTConfig()
    estimate = estimate_memory(config, grid_size, run_heads, torch_device, weights_loaded=model is not None)
    largest = max(stop - start for start, stop in ranges)
    _check_fits(estimate, largest, torch_device, max_frames, len(names))

    if model is None:
        model = load_model(weights, download, heads=run_heads)
    elif set(run_heads) - set(model.enabled_heads):
        raise UserError(f"the given model lacks the heads {sorted(set(run_heads) - set(model.enabled_heads))}")
    model = model.to(torch_device).eval()
    batch = preprocess_images([images_dir / name for name in names], preprocess, progress=progress)

    if len(ranges) > 1:
        logger.info("running VGGT on %d frames of %dx%d in %d overlapping windows of %d (%s, %s)",
                    len(names), *grid_size, len(ranges), largest, torch_device, torch_dtype)  # fmt: skip
    else:
        logger.info("running VGGT on %d frames of %dx%d (%s, %s)", len(names), *grid_size, torch_device, torch_dtype)
    start_time = time.perf_counter()

    def run_windows() -> Iterator[Predictions]:
        for start, stop in log_progress(ranges, "VGGT windows", len(ranges), progress and len(ranges) > 1):
            arrays = _run_checked(model, batch.images[start:stop], run_heads, torch_device, torch_dtype, estimate)
            _check_finite(arrays, names[start:stop])
            yield Predictions(
                image_names=names[start:stop],
                cam_from_world=arrays["extrinsic"],
                intrinsics=arrays["intrinsic"],
                grid_from_image=batch.grid_from_image[start:stop],
                depth=arrays.get("depth"),
                depth_conf=arrays.get("depth_conf"),
                world_points=arrays.get("world_points"),
                world_points_conf=arrays.get("world_points_conf"),
            )

    predictions = chain_windows(run_windows())
    logger.info("VGGT took %.1f s", time.perf_counter() - start_time)
    if output is not None:
        save_predictions(predictions, output)
    return predictions


def _run_checked(
    model: torch.nn.Module,
    images: torch.Tensor,
    heads: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    estimate: MemoryEstimate,
) -> dict[str, np.ndarray]:
    """`run_vggt`, with running out of memory turned into a clear UserError."""
    try:
        return run_vggt(model, images, heads, device, dtype)
    except torch.OutOfMemoryError:
        fit = estimate.max_frames()
        raise UserError(
            f"{device} ran out of memory running VGGT on {len(images)} frames"
            + (f" (about {fit} should fit)" if fit is not None else "")
            + f"; pass fewer images or a smaller {param('window')}"
        ) from None
