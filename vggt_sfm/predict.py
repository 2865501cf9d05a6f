"""Run VGGT on a folder of images and write the predictions file.

`predict` reads and checks the images, preprocesses them exactly as the official loader, estimates the memory
the run needs and refuses before starting when the frames will not fit, runs the model once over all frames
under `torch.inference_mode()`, decodes the cameras at the prediction-grid size and returns (and optionally
saves) a `Predictions`.

For more frames than fit in one pass: windows of consecutive frames in name order (`window`, for sequences;
`vggt_sfm.windows`) or chunks of images that see the same scene (`chunks`, for unordered collections;
`vggt_sfm.chunks`). Each pass (a window or a chunk) is one job of an `Executor` (this process, or a Ray task), and
the passes are merged into one frame by one global solve (`vggt_sfm.merge`).

Precision: on CUDA the aggregator runs under bf16 autocast (fp16 on GPUs older than compute capability 8),
on CPU in fp32; `dtype="bfloat16"` opts into bf16 autocast on CPU too. The heads always run in fp32 (the model
turns autocast off for them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, param
from .executor import Executor, LocalExecutor
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


SPLITS = {"window": ("a window", "window"), "chunks": ("a chunk", "chunks")}  # how messages name a pass, its option


def _check_fits(
    estimate: MemoryEstimate, num_frames: int, device: torch.device, max_frames: int | None, total_frames: int,
    split: str | None = None, held_frames: int | None = None,
) -> None:  # fmt: skip
    """Refuse (UserError) when `total_frames` exceed `max_frames`, or when passes over `num_frames` frames (windows
    or chunks, `split`, when fewer than `total_frames`) exceed the free memory. `held_frames`: the frames whose maps
    are kept until the passes are merged (every pass's; default `total_frames`)."""
    gb = 2.0**30
    if max_frames is not None:
        if total_frames > max_frames:
            raise UserError(f"{total_frames} images but at most {max_frames} frames are allowed (max_frames); pass fewer images")
        return
    fit = estimate.max_frames()
    if fit is None:
        return
    split = split if num_frames < total_frames else None
    gpu_hint = " or use a GPU" if device.type == "cpu" else ""
    if num_frames > fit:
        if split is not None:
            what, option = SPLITS[split]
            what = f"{what} of {num_frames} frames needs"
            hint = f"; use a smaller {param(option)} (at most {fit})"
        else:
            what, hint = f"{num_frames} frames need", "; pass fewer images"
            if fit >= 2:
                hint += (f" or predict in overlapping windows ({param('window', fit)}) or chunks of similar views "
                         f"({param('chunks', fit)})")  # fmt: skip
        raise UserError(
            f"{what} about {estimate.needed(num_frames) / gb:.1f} GB for VGGT on {device}, "
            f"but {estimate.available / gb:.1f} GB are free: about {fit} frames fit{hint}{gpu_hint}"
        )
    held = held_frames or total_frames
    needed = estimate.needed(num_frames, held)
    if needed > estimate.available * USABLE_FRACTION:
        kind = "windows" if split == "window" else "chunks"
        raise UserError(
            f"{kind} of {num_frames} frames over {total_frames} images need about {needed / gb:.1f} GB on {device} "
            f"(the depth maps of every frame are kept), but {estimate.available / gb:.1f} GB are free; "
            f"pass fewer images{gpu_hint}"
        )
    logger.info(
        "VGGT on %d frames needs about %.1f GB of %.1f GB free on %s (up to about %d frames fit in one pass)",
        held, needed / gb, estimate.available / gb, device, fit,
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


class VGGTPass:
    """VGGT over one set of frames (one pass: all frames, a window or a chunk), as an executor's job: reads and
    preprocesses its images onto the common prediction grid, runs the model, returns the pass's Predictions.

    Picklable for a remote executor: a model loaded from `weights_path` is not sent but loaded again, once per
    task, where it runs (the images folder must be at the same path there); a model given as an object is sent.
    Device and precision are resolved where it runs ("auto": that machine's GPU).
    """

    def __init__(
        self, images_dir: Path, preprocess: str, grid_size: tuple[int, int], heads: tuple[str, ...], device: str,
        dtype: str, estimate: MemoryEstimate, model: torch.nn.Module | None = None, weights_path: Path | None = None,
    ) -> None:  # fmt: skip
        self.images_dir, self.preprocess, self.grid_size, self.heads = images_dir, preprocess, grid_size, heads
        self.device, self.dtype, self.estimate = device, dtype, estimate
        self.model, self.weights_path = model, weights_path
        self._resolved: tuple[torch.device, torch.dtype] | None = None

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_resolved": None}
        if self.weights_path is not None:
            state["model"] = None
        return state

    def __call__(self, names: list[str]) -> Predictions:
        from .model.preprocess import preprocess_images
        from .model.weights import load_model

        if self._resolved is None:
            device = resolve_device(self.device)
            self._resolved = device, resolve_dtype(self.dtype, device)
        device, dtype = self._resolved
        if self.model is None:
            self.model = load_model(self.weights_path, heads=self.heads)
        self.model = self.model.to(device).eval()
        batch = preprocess_images([self.images_dir / name for name in names], self.preprocess, grid_size=self.grid_size)
        arrays = _run_checked(self.model, batch.images, self.heads, device, dtype, self.estimate)
        _check_finite(arrays, names)
        return Predictions(
            image_names=list(names),
            cam_from_world=arrays["extrinsic"],
            intrinsics=arrays["intrinsic"],
            grid_from_image=batch.grid_from_image,
            depth=arrays.get("depth"),
            depth_conf=arrays.get("depth_conf"),
            world_points=arrays.get("world_points"),
            world_points_conf=arrays.get("world_points_conf"),
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
    chunks: int = 0,
    chunk_overlap: int = 0,
    executor: Executor | None = None,
) -> Predictions:
    """VGGT predictions (cameras, depth; point maps on request) for every readable image of `images_dir`.

    Frames are the images in sorted name order; unreadable images are skipped with a warning. `weights` and
    `download` choose the checkpoint (see `vggt_sfm.model.weights`); `model` passes a ready VGGT instead.
    All frames go through one pass, unless:
    - `window` > 0 (sequences): VGGT runs on windows of that many consecutive frames, consecutive windows sharing
      `window_overlap` frames (0: a quarter of the window; `vggt_sfm.windows`);
    - `chunks` > 0 (unordered collections): VGGT runs on chunks of at most that many images that see the same
      scene, formed from the images' content (not their names), neighbouring chunks sharing `chunk_overlap`
      frames (0: a fifth of the chunk, at most 8; `vggt_sfm.chunks`).
    The passes are merged into one frame by their shared frames' depth (`vggt_sfm.merge`; needs the depth head);
    the merge's report (chunks dropped as outliers, ...) is in the result's `extras["merge_report"]` (JSON).
    `executor` runs the passes (default: this process; a `RayExecutor` runs them as Ray tasks).
    Refuses (UserError) before running when the frames (or a pass) will not fit in memory, or more than
    `max_frames` are given. With `output`, the predictions file is also written there.
    """
    from .chunks import check_chunk_options, form_chunks
    from .merge import CHUNKS, WINDOWS, merge_predictions
    from .model import VGGTConfig
    from .model.weights import find_weights, load_model
    from .windows import default_overlap, window_ranges

    images_dir = Path(images_dir)
    run_heads = parse_heads(heads)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if window and chunks:
        raise UserError(
            f"{param('window')} (sequences, in name order) and {param('chunks')} (unordered collections) are two "
            "ways to split the frames; choose one"
        )
    split = "window" if window else "chunks" if chunks else None
    if split and "depth" not in run_heads:
        noun = "windows" if window else "chunks"
        raise UserError(f"predicting in {noun} needs the depth head ({noun} are aligned by their depth); add depth to {param('heads')}")
    infos = scan_images(images_dir, list_images(images_dir), min_images=1)
    names = [info.name for info in infos]
    _, grid_size = vggt_grid_from_image([(info.width, info.height) for info in infos], preprocess)
    passes = [names]
    if window:
        passes = [names[start:stop] for start, stop in window_ranges(len(names), window, window_overlap or default_overlap(window))]
    elif chunks:
        chunk_overlap = check_chunk_options(chunks, chunk_overlap)

    config = getattr(model, "config", None) or VGGTConfig()
    estimate = estimate_memory(config, grid_size, run_heads, torch_device, weights_loaded=model is not None)
    largest = min(chunks, len(names)) if chunks else max(len(p) for p in passes)
    _check_fits(estimate, largest, torch_device, max_frames, len(names), split, sum(len(p) for p in passes))
    weights_path = find_weights(weights, download) if model is None else None

    executor = executor or LocalExecutor()
    owners = None
    if chunks and len(names) > chunks:
        plan = form_chunks(images_dir, names, chunks, chunk_overlap, progress=progress, executor=executor)
        passes, owners = plan.chunks, plan.owners()
        _check_fits(estimate, largest, torch_device, max_frames, len(names), split, plan.num_frames())
    if model is None and isinstance(executor, LocalExecutor):  # elsewhere, each task loads the weights itself
        model = load_model(weights_path, heads=run_heads)
    elif model is not None and set(run_heads) - set(model.enabled_heads):
        raise UserError(f"the given model lacks the heads {sorted(set(run_heads) - set(model.enabled_heads))}")
    if model is not None:
        model = model.to(torch_device).eval()

    kind = {"window": "overlapping windows", "chunks": "chunks of similar views"}.get(split or "", "")
    if len(passes) > 1:
        logger.info("running VGGT on %d frames of %dx%d in %d %s of up to %d (%s, %s)",
                    len(names), *grid_size, len(passes), kind, largest, torch_device, torch_dtype)  # fmt: skip
    else:
        logger.info("running VGGT on %d frames of %dx%d (%s, %s)", len(names), *grid_size, torch_device, torch_dtype)
    start_time = time.perf_counter()
    job = VGGTPass(images_dir, preprocess, grid_size, run_heads, device, dtype, estimate, model, weights_path)
    job._resolved = torch_device, torch_dtype  # here; a remote task resolves `device` on its own machine
    results = executor.map(job, passes, workers=1, gpu=str(device) != "cpu")
    label = "VGGT windows" if window else "VGGT chunks"
    parts = list(log_progress(results, label, len(passes), progress and len(passes) > 1))
    predictions, report = merge_predictions(
        parts, owners=owners, order=names, passes=WINDOWS if window else CHUNKS, average_shared=bool(chunks)
    )
    if report.dropped:
        logger.warning("VGGT %s left out of the merge (they disagree with their neighbours): %s",
                       "windows" if window else "chunks", ", ".join(map(str, report.dropped)))  # fmt: skip
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
            + f"; pass fewer images or a smaller {param('window')} or {param('chunks')}"
        ) from None
