"""Train the embedded text-to-image model (rectified flow) on procedural captioned scenes, on CPU.

    python -m lesa.embedded.train_model --out runs/embedded --ship runs/embedded/model --bf16

The defaults are the recipe of the shipped weights: one run of 6,400 steps from scratch, the shape's pixels weighted
4x (125.5 min on 2 CPU cores with --bf16; scripts/build_embedded.sh).

Seeded, resumable (a checkpoint every --save-every steps, written atomically; rerun the same command to continue),
EMA weights, a progress bar, and a periodic prompt-following check on held-out captions. At the end the EMA weights
are written as the shipped model (--ship DIR, default the package's own model folder).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, refuse_pickles, save_checkpoint
from ..io import atomic_write_text
from .checker import score
from .loading import SHIPPED_DIR, new_pipeline, save_shipped
from .pipeline import encode_text, image_ids, pack, predict_velocity
from .scenes import prompts, sample_batch, splits


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def object_weights(images: np.ndarray, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 3, H, W): `weight` on the shape and a 1 px ring around it, 1 elsewhere.

    The corner pixel is always background (shapes keep EDGE_MARGIN from the canvas edge), so whatever differs from it
    is the shape. The ring holds the pixels where circle, square and triangle of one box differ most.
    """
    shape = torch.from_numpy((images != images[:, :1, :1]).any(-1))
    ring = torch.nn.functional.max_pool2d(shape[:, None].float(), 3, stride=1, padding=1)
    return (1 + (weight - 1) * ring).expand(-1, 3, -1, -1)


class CaptionFeatures:
    """MiniLM features of captions, each computed once: training draws from a few thousand distinct captions, and
    encoding them afresh every step cost a sixth of the step."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted(set(captions) - self.cache.keys())
        if missing:
            tokens, pooled = encode_text(self.text_encoder, self.tokenizer, missing)
            self.cache.update(zip(missing, zip(tokens, pooled, strict=True), strict=True))
        return tuple(torch.stack([self.cache[c][i] for c in captions]) for i in (0, 1))


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def prompt_following(pipe, ema_state: dict, captions: list[str], steps: int = 20, guidance: float = 3.0) -> dict:
    """Checker scores of EMA-weight samples for `captions` (seed = caption index)."""
    live = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.transformer.load_state_dict(ema_state)
    pipe.transformer.eval()
    try:
        noise = torch.stack(
            [torch.randn(256, 12, generator=torch.Generator().manual_seed(i)) for i in range(len(captions))]
        )
        images = pipe(
            captions, num_inference_steps=steps, guidance_scale=guidance, latents=noise, output_type="np"
        ).images
    finally:
        pipe.transformer.load_state_dict(live)
        pipe.transformer.train()
    return score(images, captions)


# the options a resumed run must share with its checkpoint (the others, e.g. --stop-at or --threads, may change)
RUN_DEFINING = (
    "init",
    "steps",
    "batch",
    "lr",
    "lr_min",
    "warmup",
    "ema",
    "drop_caption",
    "seed",
    "timesteps",
    "object_weight",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/embedded", help="checkpoints and logs")
    parser.add_argument("--ship", default=str(SHIPPED_DIR), help="where the final EMA weights are written")
    parser.add_argument("--steps", type=int, default=6400, help="length of the learning-rate schedule")
    parser.add_argument("--stop-at", type=int, default=None, help="checkpoint and stop at this step (resume later)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-min", type=float, default=3e-5)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--drop-caption", type=float, default=0.1, help="share of empty captions (for CFG)")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--check-every", type=int, default=800, help="prompt-following check on 16 held-out captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timesteps",
        choices=("uniform", "logit-normal"),
        default="uniform",
        help="training noise levels; logit-normal starves the high-noise steps that decide layout at this scale",
    )
    parser.add_argument(
        "--init",
        default=None,
        help="start from this embedded model's weights (e.g. the shipped one) instead of random ones: fine-tuning; "
        "the optimizer and EMA start afresh",
    )
    parser.add_argument(
        "--object-weight",
        type=float,
        default=4.0,
        help="loss weight of the shape's pixels and a 1 px ring around them (background 1): the shape's outline is "
        "a few dozen of 1,024 pixels, so with plain MSE its gradient is faint and shape is learned last",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the transformer (faster on CPUs with AVX512-BF16 or AMX; weights, optimizer "
        "and EMA stay float32)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.safetensors"
    refuse_pickles(out, "checkpoint.pt")
    pipe = new_pipeline(args.seed)
    pipe.set_progress_bar_config(disable=True)
    model, caption_features = pipe.transformer, CaptionFeatures(pipe.text_encoder, pipe.tokenizer)
    if args.init is not None:  # the transformer's weights only: the text encoder is the package's anyway
        weights = Path(args.init) / "transformer"
        if not weights.is_dir():
            raise FileNotFoundError(f"--init {args.init} holds no embedded model (no transformer/ folder)")
        model.load_state_dict(type(model).from_pretrained(weights).state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    step, log, seconds = 0, [], 0.0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        changed = [k for k in RUN_DEFINING if k in ckpt["args"] and ckpt["args"][k] != getattr(args, k)]
        if changed:  # resuming would silently mix two runs (two lr schedules, two losses, two starts)
            was = ", ".join(f"--{k.replace('_', '-')} {ckpt['args'][k]}" for k in changed)
            now = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in changed)
            raise ValueError(
                f"{ckpt_path} was started with {was}, not {now}: rerun with the same options to resume it, or give "
                "another --out"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ema = ckpt["ema"]
        rng.bit_generator.state = ckpt["numpy_rng"]
        generator.set_state(ckpt["torch_rng"])
        step, log, seconds = ckpt["step"], ckpt["log"], ckpt["seconds"]
        print(f"resuming from {ckpt_path} at step {step}")
    train_scenes = splits()["train"]
    check_captions = prompts("predictor")[:16]  # never the evaluation prompts
    img_ids = image_ids(32, 32)
    start = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="train embedded model", unit="step")
    stop = min(args.steps, args.stop_at or args.steps)
    while step < stop:
        images, captions = sample_batch(rng, args.batch, train_scenes)
        drop = rng.random(len(captions)) < args.drop_caption
        captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        tokens, pooled = caption_features(captions)
        x0 = pack(to_pixels(images))
        noise = torch.randn(x0.shape, generator=generator)
        if args.timesteps == "uniform":
            t = torch.rand(x0.shape[0], generator=generator)
        else:
            t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = predict_velocity(model, xt, tokens, pooled, t, img_ids)
        squared = (pred.float() - (noise - x0)) ** 2
        if args.object_weight == 1.0:
            loss = squared.mean()
        else:
            weights = pack(object_weights(images, args.object_weight))
            loss = (weights * squared).sum() / weights.sum()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps, args.lr_min)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        entry = {"step": step, "loss": loss.item()}
        if step % args.check_every == 0 or step == args.steps:
            entry["check"] = prompt_following(pipe, ema, check_captions)
            tqdm.write(f"step {step}: prompt-following on 16 held-out captions (20 steps) {json.dumps(entry['check'])}")
        log.append(entry)
        if step % args.save_every == 0 or step == stop:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema,
                "step": step,
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": generator.get_state(),
                "log": log,
                "args": vars(args),
                "seconds": seconds + time.perf_counter() - start,
            }
            save_checkpoint(ckpt_path, state)
    bar.close()
    if step < args.steps:
        print(f"stopped at step {step} of {args.steps}; rerun to continue from {ckpt_path}")
        return
    model.load_state_dict(ema)
    save_shipped(model.eval(), args.ship)
    elapsed = seconds + time.perf_counter() - start
    summary = {"steps": step, "training_seconds": elapsed, "args": vars(args), "final_check": log[-1].get("check")}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "log.json", json.dumps(log) + "\n")
    print(f"wrote the EMA weights to {args.ship} after {step} steps ({elapsed / 60:.1f} min of training in all)")


if __name__ == "__main__":
    main()
