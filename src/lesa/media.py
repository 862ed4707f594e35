"""Writing a pipeline's result to a file a person can open: an image, or a video as MP4 / animated GIF / PNG frames."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ENCODED_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


def to_pil_frames(frames: Any) -> list[Image.Image]:
    """One video's frames as PIL images: a list of PIL images, or an array (frames, H, W, C) in [0, 1] or uint8."""
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], Image.Image):
        return list(frames)
    array = np.asarray(frames.detach().cpu().float() if hasattr(frames, "detach") else frames)
    if array.ndim != 4:
        raise ValueError(f"expected video frames shaped (frames, height, width, channels), got {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame) for frame in array]


def video_encoder_available() -> bool:
    """Whether `diffusers.utils.export_to_video` can write here: it uses imageio whenever imageio is installed (and
    then needs imageio-ffmpeg), and falls back to OpenCV only when imageio is absent."""
    has = importlib.util.find_spec
    if has("imageio") is not None:
        return has("imageio_ffmpeg") is not None
    return has("cv2") is not None


def check_output_path(path: str | Path, video: bool) -> None:
    """Refuse, before any work is done, an output name that cannot hold this kind of result."""
    suffix = Path(path).suffix.lower()
    if not video:
        if suffix not in IMAGE_SUFFIXES:
            raise ValueError(f"--out {path}: an image is written as {', '.join(IMAGE_SUFFIXES)}")
        return
    if suffix in ENCODED_VIDEO_SUFFIXES:
        if not video_encoder_available():
            raise ValueError(
                f"--out {path}: writing {suffix} needs a video encoder (pip install imageio imageio-ffmpeg, or "
                "opencv-python), and none is installed; use --out NAME.gif (animated GIF) or --out DIR/ (PNG frames)"
            )
    elif suffix and suffix != ".gif":
        raise ValueError(
            f"--out {path}: a video is written as .gif (animated GIF), a directory of PNG frames (a name without "
            f"suffix) or, with imageio-ffmpeg or OpenCV installed, {', '.join(ENCODED_VIDEO_SUFFIXES)}"
        )


def save_video(frames: Any, path: str | Path, fps: int = 8) -> Path:
    """Write one video by the suffix of `path`: .gif, an encoded video (.mp4, ...), or PNG frames into a directory."""
    path = Path(path)
    check_output_path(path, video=True)
    pil = to_pil_frames(frames)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        path.parent.mkdir(parents=True, exist_ok=True)
        pil[0].save(path, save_all=True, append_images=pil[1:], duration=max(1, round(1000 / fps)), loop=0)
    elif suffix in ENCODED_VIDEO_SUFFIXES:
        from diffusers.utils import export_to_video

        path.parent.mkdir(parents=True, exist_ok=True)
        export_to_video(pil, str(path), fps=fps)
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(pil):
            frame.save(path / f"frame_{i:05d}.png")
    return path
