"""The bench's human-readable outputs: a Markdown table and a quality-against-speed-up plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_path

_METRICS = (
    ("psnr", "PSNR (dB)", 2),
    # on the BT.601 luma (`metrics.ssim`): per-RGB-channel SSIM (torchmetrics, pytorch-msssim) gives other values
    ("ssim", "SSIM (luma)", 4),
    ("ms_ssim", "MS-SSIM (luma)", 4),
    ("lpips", "LPIPS", 4),
    ("clip_score", "CLIP", 2),
    ("image_reward", "ImageReward", 3),
    ("prompt_following", "prompt-following", 3),
)


def _pm(value: Any, digits: int) -> str:
    if not value:
        return "-"
    mean, se = value
    se_text = "" if se != se else f" ± {se:.{digits}f}"  # NaN se: a single prompt
    return f"{mean:.{digits}f}{se_text}"


def results_table(results: dict[str, Any]) -> str:
    """Markdown: one row per method, mean ± standard error over prompts (seed spread where several seeds)."""
    rows = results["rows"]
    shown = [(k, label, d) for k, label, d in _METRICS if any(r.get(k) for r in rows)]
    header = ["method", "budget", "seeds", "trunk exec.", "FLOPs speed-up", "wall-clock speed-up"]
    header += [label for _, label, _ in shown] + ["ΔPSNR vs TaylorSeer O1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["row"],
            r["budget"] or f"{results['config']['steps']}/{results['config']['steps']}",  # full compute
            str(r["seeds"]) if r["family"] == "lesa" else "-",
            f"{r['trunk_executions']:.2f}",
            f"{r['flops_speedup']:.2f}x",
            f"{r['wallclock_speedup']:.2f}x",
        ]
        for key, _, digits in shown:
            text = _pm(r.get(key), digits)
            spread = r.get(f"{key}_seed_spread")
            if spread is not None:
                text += f" (seeds ±{spread:.{digits}f})"
            cells.append(text)
        cells.append(_pm(r.get("psnr_vs_taylorseer_o1"), 2))
        lines.append("| " + " | ".join(cells) + " |")
    machine = results["machine"]
    fitted = [
        f"- {r['row']}: " + ", ".join(f"{k} = {_short(v)}" for k, v in r["fitted"].items()) for r in rows if r["fitted"]
    ]
    parts = [
        f"# lesa bench: {results['model']}, {results['n_prompts']} prompts, {results['config']['steps']} steps",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {machine['platform']}, Python {machine['python']}, torch {machine['torch']}, "
        f"device {machine['device']}, {machine['threads']} threads.",
        "",
        "Quality is measured against the unaccelerated image of the same seed (mean ± standard error over prompts). "
        "Trunk executions are counted per generation; FLOPs are counted (matrix products and attention); wall-clock "
        "speed-up is the median over interleaved repeats on this machine. SSIM and MS-SSIM are computed on the BT.601 "
        "luma.",
        "",
        *lines,
    ]
    if fitted:
        parts += ["", "Fitted on the fitting prompts (never the evaluation prompts):", *fitted]
    if results["notices"]:
        parts += ["", "Notices:", *[f"- {n}" for n in results["notices"]]]
    return "\n".join(parts) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return str(value)


def pareto_plot(results: dict[str, Any], path: str | Path) -> None:
    """PSNR against counted FLOPs speed-up, one marker per method and budget (error bars: standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {
        "lesa": "*",
        "fora": "s",
        "taylorseer-o1": "o",
        "taylorseer-o2": "o",
        "taylorseer-damped": "D",
        "linear": "^",
        "teacache": "v",
        "diffusers-taylorseer": "P",
        "diffusers-fbcache": "X",
        "diffusers-magcache": "h",
    }
    for r in results["rows"]:
        if not r.get("psnr"):
            continue
        mean, se = r["psnr"]
        ax.errorbar(
            r["flops_speedup"],
            mean,
            yerr=se if se == se else None,
            fmt=markers.get(r["family"], "o"),
            markersize=12 if r["family"] == "lesa" else 7,
            capsize=3,
            label=r["row"],
        )
    ax.set_xlabel("counted FLOPs speed-up (x)")
    ax.set_ylabel("PSNR vs full compute (dB)")
    ax.set_title(f"{results['model']}: {results['n_prompts']} prompts, {results['config']['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
