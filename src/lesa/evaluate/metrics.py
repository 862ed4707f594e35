"""Image-quality metrics for `lesa bench`: PSNR, SSIM, MS-SSIM, LPIPS (AlexNet v0.1), CLIPScore, ImageReward.

SSIM and MS-SSIM are computed on the BT.601 luma ("SSIM (luma)" in reports): per-RGB-channel SSIM, as torchmetrics and
pytorch-msssim compute it, gives other values.

Images are RGB ``uint8`` numpy arrays of shape (H, W, 3) with values 0..255 (a ``PIL.Image`` is converted to RGB);
float arrays are rejected rather than guessed at. Reference metrics (PSNR, SSIM, MS-SSIM, LPIPS) compare two images
of the same shape. Metrics that need weights or optional packages raise `MetricUnavailable` when those are absent, so
the caller can print a notice and skip the metric.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ImageLike = np.ndarray | Image.Image

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# After 4 halvings (odd sides rounded up) the coarsest scale must still hold one 11-px window: (11 - 1) * 2**4 + 1.
MS_SSIM_MIN_SIDE = (SSIM_WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (optional package not installed, weights not on disk); report it as skipped."""


# ----------------------------------------------------------------------------------------------- image handling


def _as_image(x: ImageLike, name: str) -> np.ndarray:
    """Return `x` as a uint8 (H, W, 3) array, or raise naming the argument and what was expected."""
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"))
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a uint8 HxWx3 numpy array or PIL image, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected dtype uint8 (0..255), got {x.dtype}; convert floats in [0, 1] with "
            "(x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"{name}: expected shape (H, W, 3) RGB, got {x.shape}")
    return x


def _as_pair(a: ImageLike, b: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_image(a, "a"), _as_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got a {a.shape} and b {b.shape}")
    return a, b


def _luma(x: np.ndarray) -> torch.Tensor:
    """BT.601 luma of a uint8 RGB image on the 0..255 scale, as a float64 (1, 1, H, W) tensor."""
    rgb = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64)
    y = rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]
    return y[None, None]


# ----------------------------------------------------------------------------------------------- PSNR / SSIM


def psnr(a: ImageLike, b: ImageLike) -> float:
    """Peak signal-to-noise ratio in dB over all RGB values (peak 255); ``inf`` for identical images."""
    a, b = _as_pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window as a float64 (1, 1, size, size) tensor."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def _ssim_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term of two (1, 1, H, W) float64 images ('valid' Gaussian filtering).

    Population (not sample) covariances, as in Wang et al. 2004 and skimage with ``gaussian_weights=True,
    use_sample_covariance=False``.
    """
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    window = _gaussian_window().expand(5, 1, SSIM_WINDOW, SSIM_WINDOW)
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, groups=5)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.unbind(dim=1)
    var_x, var_y, cov = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    lum_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return float((lum_map * cs_map).mean()), float(cs_map.mean())


def ssim(a: ImageLike, b: ImageLike) -> float:
    """Structural similarity of the BT.601 luma of two RGB images (Gaussian window 11, sigma 1.5, K1 0.01,
    K2 0.03, data range 255, 'valid' filtering: no padded border). 1.0 for identical images.

    Raises ValueError when a side is shorter than the 11-px window.
    """
    a, b = _as_pair(a, b)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} px, got {a.shape[0]}x{a.shape[1]}")
    return _ssim_terms(_luma(a), _luma(b))[0]


def _downsample(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling; an odd side is first extended by repeating its last row/column (Wang's reference
    MS-SSIM: 2x2 mean filter with symmetric boundary, then every second pixel), so a side n becomes ceil(n / 2)."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    return F.avg_pool2d(x, 2)


def ms_ssim(a: ImageLike, b: ImageLike) -> float | None:
    """5-scale MS-SSIM (Wang et al. 2003; weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333) of the BT.601 luma.

    Scales 1-4 contribute their mean contrast-structure term, scale 5 its full SSIM, each with the same window and
    constants as `ssim`; terms are clipped at 0 before the weighted geometric product (a negative term would make a
    fractional power undefined). Returns ``None`` when the shorter side is below `MS_SSIM_MIN_SIDE` (161 px), too
    small for 5 scales with an 11-px window: the caller must report the metric as skipped, not as a number.
    """
    a, b = _as_pair(a, b)
    if min(a.shape[:2]) < MS_SSIM_MIN_SIDE:
        return None
    x, y = _luma(a), _luma(b)
    result = 1.0
    last = len(MS_SSIM_WEIGHTS) - 1
    for i, weight in enumerate(MS_SSIM_WEIGHTS):
        full, cs = _ssim_terms(x, y)
        result *= max(full if i == last else cs, 0.0) ** weight
        if i < last:
            x, y = _downsample(x), _downsample(y)
    return result


# ----------------------------------------------------------------------------------------------- LPIPS

# torchvision alexnet().features: (in, out, kernel, stride, padding) of the convs at indices 0, 3, 6, 8, 10.
_ALEX_CONVS = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1))
_ALEX_TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs whose outputs LPIPS compares
LPIPS_CHANNELS = tuple(c[1] for c in _ALEX_CONVS)
_LPIPS_EPS = 1e-10


def _alex_last_tap_side(side: int) -> int:
    """Spatial side of AlexNet's last tap (relu5) for an input side: conv1 (k11 s4 p2), pool1, pool2 (k3 s2)."""
    s = (side + 2 * 2 - 11) // 4 + 1
    s = (s - 3) // 2 + 1  # maxpool after relu1
    return (s - 3) // 2 + 1  # maxpool after relu2; convs 2-5 keep the size


LPIPS_MIN_SIDE = next(s for s in range(1, 256) if _alex_last_tap_side(s) >= 1)  # 31 px


class _LinearHead(nn.Module):
    """1x1 conv to one channel, laid out like lpips' NetLinLayer (``model.1.weight``; index 0 was its dropout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), in plain torch.

    ``features`` matches torchvision's ``alexnet().features`` key for key, ``lin0``..``lin4`` match lpips'
    ``weights/v0.1/alex.pth``. Build it with `from_files`; a fresh instance has random weights.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (cin, cout, k, stride, pad) in enumerate(_ALEX_CONVS):
            layers += [nn.Conv2d(cin, cout, k, stride=stride, padding=pad), nn.ReLU()]
            if i in (0, 1, 4):
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        self.features = nn.Sequential(*layers)
        for i, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(channels))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, paths: Sequence[str | Path] | str | Path, device: str | torch.device = "cpu") -> LPIPS:
        """Build from one or more state-dict files (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``,
        or ``.safetensors``), merged in order (a later file wins on a repeated key).

        Typically torchvision's ``alexnet-owt-7be5be79.pth`` (``features.*``; ``classifier.*`` ignored) plus lpips'
        ``alex.pth`` (``lin*``). Keys with other prefixes are ignored. Raises `MetricUnavailable` if a file does not
        exist, ValueError if a file is unreadable, a required key is missing, or a tensor has the wrong shape.
        """
        paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
        if not paths:
            raise ValueError(
                "LPIPS.from_files: no weight files given; expected e.g. [alexnet-owt-7be5be79.pth, alex.pth]"
            )
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise MetricUnavailable(
                f"LPIPS weights not found: {', '.join(absent)} (expected torchvision's alexnet-owt-7be5be79.pth for "
                "features.* and lpips' v0.1 alex.pth for lin0..lin4)"
            )
        model = cls()
        expected = model.state_dict()
        chosen: dict[str, torch.Tensor] = {}
        for path in paths:
            for key, value in _read_state_dict(path).items():
                if key not in expected:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{path}: key {key!r} holds a {type(value).__name__}, expected a tensor")
                want = tuple(expected[key].shape)
                if tuple(value.shape) != want:
                    raise ValueError(f"{path}: key {key!r} has shape {tuple(value.shape)}, expected {want}")
                chosen[key] = value
        missing = [k for k in expected if k not in chosen]
        if missing:
            raise ValueError(
                f"LPIPS weights incomplete: missing keys {missing} (read: {', '.join(str(p) for p in paths)}); "
                "features.* come from torchvision's AlexNet checkpoint, lin{0..4}.model.1.weight from lpips' alex.pth"
            )
        model.load_state_dict(chosen, strict=True)
        return model.to(device)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distances, shape (N,), of two (N, 3, H, W) batches with values in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (N, 3, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < LPIPS_MIN_SIDE:
            raise ValueError(
                f"LPIPS (AlexNet) needs images of at least {LPIPS_MIN_SIDE}x{LPIPS_MIN_SIDE} px, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        h = (torch.cat([x, y]) - self.shift) / self.scale
        total = torch.zeros(x.shape[0], dtype=h.dtype, device=h.device)
        tap = 0
        for i, layer in enumerate(self.features[: _ALEX_TAPS[-1] + 1]):
            h = layer(h)
            if i != _ALEX_TAPS[tap]:
                continue
            fx, fy = h.chunk(2)
            fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + _LPIPS_EPS)
            fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + _LPIPS_EPS)
            total = total + getattr(self, f"lin{tap}")((fx - fy) ** 2).mean(dim=(1, 2, 3))
            tap += 1
        return total

    def distance(self, a: ImageLike, b: ImageLike) -> float:
        """LPIPS distance of two uint8 RGB images of one shape (scaled to [-1, 1]); 0 for identical images."""
        a, b = _as_pair(a, b)
        param = next(self.parameters())
        t = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).to(device=param.device, dtype=param.dtype)
        t = t / 127.5 - 1.0
        with torch.inference_mode():
            return float(self(t[:1], t[1:])[0])


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    """Load a state dict from ``.safetensors`` or a torch pickle (weights only), onto the CPU."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read it as a state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(state).__name__}")
    return state


# ----------------------------------------------------------------------------------------------- CLIPScore


class CLIPScore:
    """CLIPScore (Hessel et al. 2021, torchmetrics convention): 100 * max(cos(image embedding, text embedding), 0).

    Text longer than the model's context (77 tokens for OpenAI CLIP) is truncated.
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> CLIPScore:
        """Load ``transformers.CLIPModel`` and ``CLIPProcessor`` from a local directory (never the hub).

        Raises `MetricUnavailable` if the directory does not exist, ValueError if it does not hold a loadable
        CLIP checkpoint.
        """
        path = Path(path)
        if not path.is_dir():
            raise MetricUnavailable(
                f"CLIP model directory not found: {path} (expected a local transformers CLIP checkpoint with "
                "config.json, weights, tokenizer and image-processor files, e.g. a saved openai/clip-vit-large-patch14)"
            )
        from transformers import CLIPModel, CLIPProcessor  # deferred: importing transformers models is slow

        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(
                f"{path}: cannot load a CLIPModel + CLIPProcessor from this directory ({type(e).__name__}: {e}); "
                "expected config.json, model weights, tokenizer files and processor/preprocessor config"
            ) from e
        return cls(model, processor, device)

    def score(self, image: ImageLike, text: str) -> float:
        """CLIPScore of one RGB image (uint8 HxWx3 array or PIL image) and one caption, in [0, 100]."""
        pil = Image.fromarray(_as_image(image, "image"))
        max_len = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(
            text=[text], images=[pil], return_tensors="pt", padding=True, truncation=True, max_length=max_len
        )
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        img = F.normalize(out.image_embeds.double(), dim=-1)
        txt = F.normalize(out.text_embeds.double(), dim=-1)
        return 100.0 * max(float((img * txt).sum()), 0.0)


# ----------------------------------------------------------------------------------------------- ImageReward


class ImageRewardScore:
    """ImageReward (Xu et al. 2023) via the optional ``ImageReward`` package (``pip install image-reward``)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu") -> ImageRewardScore:
        """Load a local ImageReward checkpoint (``ImageReward.pt``, or a directory holding it) with
        ``ImageReward.load``; a ``med_config.json`` beside it is passed along so nothing is downloaded for it
        (the package may still need its BERT tokenizer in the Hugging Face cache).

        Raises `MetricUnavailable` if the package is not installed or the checkpoint is missing, and a ValueError
        if a checkpoint that is there does not load (as CLIPScore and LPIPS do: a broken file is an error, not a
        metric to skip).
        """
        try:
            import ImageReward
        except ImportError as e:
            raise MetricUnavailable(
                "ImageReward metric needs the optional `image-reward` package (import name `ImageReward`): "
                "pip install image-reward"
            ) from e
        path = Path(path)
        if path.is_dir():
            path = path / "ImageReward.pt"
        if not path.is_file():
            raise MetricUnavailable(f"ImageReward checkpoint not found: {path} (expected ImageReward.pt)")
        kwargs: dict[str, Any] = {"device": str(device)}
        med_config = path.parent / "med_config.json"
        if med_config.is_file() and "med_config" in inspect.signature(ImageReward.load).parameters:
            kwargs["med_config"] = str(med_config)
        try:
            model = ImageReward.load(str(path), **kwargs)
        except Exception as e:
            raise ValueError(f"ImageReward could not load {path}: {type(e).__name__}: {e}") from e
        return cls(model)

    def score(self, prompt: str, image: ImageLike) -> float:
        """ImageReward score (unbounded; higher is better) of one RGB image for its prompt."""
        pil = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(_as_image(image, "image"))
        with torch.inference_mode():
            value = self.model.score(prompt, pil)
        if isinstance(value, list | tuple):
            value = value[0]
        return float(value)
