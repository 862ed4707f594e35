"""Fit `lesa estimate`'s per-block rules at real model widths and check them on configurations not used to fit them.

    python benchmarks/fit_estimate.py measure [--out runs/fit_estimate] [--models flux,qwen,hunyuan,wan]
    python benchmarks/fit_estimate.py fit     [--out runs/fit_estimate] [--write]   # rules.json (shipped with --write)
    python benchmarks/fit_estimate.py report  [--out runs/fit_estimate]             # measured vs estimated tables
    python benchmarks/fit_estimate.py compose [--out runs/fit_estimate]             # a whole closed loop, tiny FLUX

`measure` builds each shipped model's transformer (`src/lesa/estimate/configs/`) at its real width with two blocks of
each kind (random bf16 weights, CPU) and measures it (`lesa.estimate.measure.measure`: FLOPs, what autograd keeps,
peak live bytes of inference, of training and of training with checkpointed blocks) at two fit geometries and two
held-out geometries of 256-1,024 tokens; each VAE's decode at small sizes (FLOPs and peak, for the linear per-pixel
rule of `lesa generate`); and the full transformers' forward FLOPs at the real resolutions on the meta device (every
block, no memory), a check of the FLOP rule at full scale. Measurements are cached in `--out` (a rerun measures only
what is missing). `fit` fits the rules on the fit geometries only; `report` prints every held-out quantity measured
against the estimate. `compose` checks how the estimate composes calls into `lesa train`'s closed loop (loss final:
which steps keep what for backward, the forecast, the head): the live tensor bytes of the real `final_loss` rollout
and its backward on a tiny FLUX pipeline (CPU, fp32), against the estimate from that pipeline's configs. About 20
minutes on 2 CPU cores, ~4 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lesa.estimate import rules as R
from lesa.estimate.measure import Geometry, Measurement, measure
from lesa.estimate.spec import load_spec

MODELS = {
    "flux": ("flux.1-dev", (2, 2)),
    "qwen": ("qwen-image", (2,)),
    "hunyuan": ("hunyuanvideo", (2, 2)),
    "wan": ("wan2.1-t2v-1.3b", (2,)),
}
# (frames, latent-token rows, columns, text tokens): 256-1,024 tokens, no count equal to a model width
IMAGE = {
    "fit": [Geometry(1, 16, 16, 160), Geometry(1, 24, 32, 200)],
    "held_out": [Geometry(1, 20, 20, 112), Geometry(1, 16, 40, 300)],
}
VIDEO = {
    "fit": [Geometry(1, 16, 16, 160), Geometry(3, 16, 16, 200)],
    "held_out": [Geometry(2, 14, 16, 112), Geometry(2, 20, 20, 100)],
}
WAN = {
    "fit": [Geometry(1, 16, 16, 160), Geometry(3, 16, 16, 200)],
    "held_out": [Geometry(2, 14, 16, 512), Geometry(4, 12, 18, 96)],
}
GEOMETRIES = {"flux": IMAGE, "qwen": IMAGE, "hunyuan": VIDEO, "wan": WAN}
QUANTITIES = (
    ("forward_flops", "forward FLOPs"),
    ("backward_flops", "backward FLOPs (input grads)"),
    ("peak_inference", "inference peak (activations)"),
    ("retained", "kept for backward"),
    ("peak_train", "training peak"),
    ("kept_checkpoint", "kept, checkpointed"),
    ("peak_train_checkpoint", "training peak, checkpointed"),
    ("retained_cached", "kept by a cached step"),
)


def _key(model: str, split: str, geo: Geometry) -> str:
    return f"{model}:{split}:{geo.frames}x{geo.height}x{geo.width}+{geo.text}"


def _load(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {json.loads(line)["key"]: json.loads(line) for line in path.read_text().splitlines() if line.strip()}


def cmd_measure(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "measurements.jsonl"
    done = _load(path)
    for model in args.models.split(","):
        name, layers = MODELS[model]
        spec = load_spec(name)
        tcfg = spec.transformer_config
        for split, geos in GEOMETRIES[model].items():
            for geo in geos:
                key = _key(model, split, geo)
                if key in done:
                    continue
                start = time.perf_counter()
                m = measure(spec.transformer_class, tcfg, layers, geo)
                row = {"key": key, "model": model, "split": split, **m.to_json()}
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{key}: {time.perf_counter() - start:.0f} s", flush=True)
    vae_path = out / "vae.jsonl"
    done = _load(vae_path)
    from lesa.estimate.vae import VAE_SIZES, measure_vae

    for model in args.models.split(","):
        spec = load_spec(MODELS[model][0])
        for size in [s for split in ("fit", "held_out") for s in VAE_SIZES[spec.vae_class][split]]:
            key = f"{model}:vae:{'x'.join(map(str, size))}"
            if key in done:
                continue
            row = {"key": key, "model": model, **measure_vae(spec.vae_class, spec.vae_config, size)}
            with vae_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{key}: {row['seconds']:.0f} s", flush=True)
    meta_path = out / "meta_flops.jsonl"
    done = _load(meta_path)
    from lesa.estimate.core import meta_call_flops

    for model in args.models.split(","):
        key = f"{model}:meta"
        if key in done:
            continue
        spec = load_spec(MODELS[model][0])
        row = {"key": key, "model": model, **meta_call_flops(spec)}
        with meta_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: {row['seconds']:.0f} s", flush=True)


def _measurements(out: Path, split: str) -> dict[str, list[Measurement]]:
    rows = _load(out / "measurements.jsonl").values()
    by_model: dict[str, list[Measurement]] = {}
    for row in rows:
        if row["split"] != split:
            continue
        data = {k: v for k, v in row.items() if k not in ("key", "model", "split")}
        by_model.setdefault(row["model"], []).append(Measurement.from_json(data))
    return by_model


def cmd_fit(args) -> None:
    out = Path(args.out)
    fitted = {}
    for ms in _measurements(out, "fit").values():
        fitted[ms[0].model_class] = R.fit(ms)
    from lesa.estimate.vae import fit_vae

    vae = fit_vae(list(_load(out / "vae.jsonl").values()))
    rules = {
        "fitted": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/fit_estimate.py measure && python benchmarks/fit_estimate.py fit --write",
        "torch": torch.__version__,
        "fit_geometries": {m: [g.__dict__ for g in GEOMETRIES[m]["fit"]] for m in MODELS},
        "transformers": fitted,
        "vae": vae,
    }
    text = json.dumps(rules, indent=1, sort_keys=True) + "\n"
    (out / "rules.json").write_text(text)
    if args.write:
        from lesa.estimate.core import RULES_PATH

        RULES_PATH.write_text(text)
        print(f"wrote {RULES_PATH}")
    print(f"wrote {out / 'rules.json'}")


def _ratio_table(rows: list[tuple[str, str, float, float]]) -> str:
    lines = ["| configuration | quantity | measured | estimated | estimated / measured |", "|---|---|---|---|---|"]
    for config, quantity, measured, estimated in rows:
        unit = "GFLOP" if "FLOPs" in quantity else "MiB"
        scale = 1e9 if unit == "GFLOP" else 2**20
        lines.append(
            f"| {config} | {quantity} | {measured / scale:,.1f} {unit} | {estimated / scale:,.1f} {unit} | "
            f"{estimated / measured:.3f} |"
        )
    return "\n".join(lines)


def cmd_report(args) -> None:
    out = Path(args.out)
    rules_path = out / "rules.json"
    rules = json.loads(rules_path.read_text())
    worst = {"held_out": 0.0, "fit": 0.0}
    rows = []
    for split in ("held_out", "fit"):
        for model, ms in sorted(_measurements(out, split).items()):
            for m in ms:
                fitted = rules["transformers"][m.model_class]
                config = dict(m.config)
                for (name, _), n in zip(R.LAYER_FIELDS[m.model_class], m.layers, strict=True):
                    config[name] = n
                arch = R.module_params(m.model_class, config)
                dims = R.model_dims(m.model_class, config)
                est = R.predict_call(fitted, arch, m.geometry, dims, m.dtype)
                got = R.measured_call(m)
                g = m.geometry
                label = f"{model} {'+'.join(map(str, m.layers))} blocks, {g.image_tokens} latent + {g.text} text tokens"
                for key, name in QUANTITIES:
                    worst[split] = max(worst[split], abs(est[key] / got[key] - 1))
                    if split == "held_out":
                        rows.append((label, name, got[key], est[key]))
    print("## Per call, held-out geometries: measured (CPU, bf16, random weights, real widths) against the rules\n")
    print(_ratio_table(rows))
    print(
        f"\nlargest deviation: {worst['held_out']:.1%} on the held-out geometries, {worst['fit']:.1%} on the fit "
        "geometries"
    )
    from lesa.estimate.vae import vae_table

    print("\n## VAE decode, measured against the per-pixel rule\n")
    print(vae_table(list(_load(out / "vae.jsonl").values()), rules["vae"]))
    from lesa.estimate.core import meta_table

    print("\n## Full transformer call at the real resolution: forward FLOPs counted on the meta device vs rules\n")
    print(meta_table(list(_load(out / "meta_flops.jsonl").values()), rules))


def cmd_compose(args) -> None:
    """The closed loop of `lesa train` (loss final, exact gradient) on a tiny FLUX pipeline: live tensor bytes kept
    after the rollout and at the peak of its backward, measured against the estimate's composition of the rules."""
    import tempfile

    import lesa
    from lesa.estimate.core import Workload, call_shape, predictor_graph_bytes, transformer_call
    from lesa.estimate.core import _schedule_counts as schedule_counts
    from lesa.estimate.measure import LiveBytes
    from lesa.estimate.spec import spec_from_pipeline
    from lesa.record import record
    from lesa.recording import Recording
    from lesa.testing import tiny_flux_pipeline
    from lesa.training import TrainConfig, Trainer
    from lesa.training.phases import frozen_pipeline

    rules = json.loads((Path(args.out) / "rules.json").read_text())
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = spec_from_pipeline(pipe, "tiny FLUX")
    steps, size = 20, 32
    prompts = [f"a test prompt number {i}" for i in range(4)]
    lines = [
        "| micro-batch | trunk | kept after the rollout: measured | estimated | ratio | peak of its backward: "
        "measured | estimated | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        record(
            pipe,
            prompts,
            tmp,
            model="tiny",
            steps=steps,
            height=size,
            width=size,
            dtype="float32",
            progress=False,
            log=lambda *_: None,
        )
        rec = Recording(tmp)
        for micro in (1, 2):
            for checkpoint in (True, False):
                cfg = TrainConfig.from_recipe(
                    "calibrated",
                    schedule="uniform",
                    correction=False,
                    gain_init="reuse",
                    batch_size=2,
                    micro_batch=micro,
                    checkpoint_trunk=checkpoint,
                    val_fraction=0.25,
                    loss_cycles=0,
                )
                trainer = Trainer(rec, pipe, Path(tmp) / "p", cfg, progress=False, log=lambda *_: None)
                phases = trainer.phases()
                predictor = phases.new_predictor(0)
                batch = trainer.train_idx[:micro]
                data = [trainer.data.load(i) for i in batch]
                config = lesa.LESAConfig(
                    predictor=predictor,
                    differentiable=True,
                    history_grad=True,
                    checkpoint_trunk=checkpoint,
                    count_flops=False,
                )
                lesa.enable(pipe, config)
                try:
                    with frozen_pipeline(pipe), LiveBytes() as memory:
                        loss = phases.final_loss(batch, data)
                        kept = memory.sweep()
                        torch.autograd.grad(loss, list(predictor.parameters()), allow_unused=True)
                finally:
                    lesa.disable(pipe)
                work = Workload(height=size, width=size, steps=steps, text_tokens=512, contexts=1, dtype="float32")
                shape = call_shape(spec, work)
                counts = schedule_counts(cfg, steps)
                call = transformer_call(spec, shape, micro, "float32", rules)
                per_full = call["kept_checkpoint"] if checkpoint else call["retained"]
                per_cached = call["cached_retained"] + predictor_graph_bytes(cfg)
                est_kept = counts["graph_full"] * per_full + counts["graph_cached"] * per_cached
                transient = call["transient_checkpoint" if checkpoint else "transient_train"]
                est_peak = est_kept + transient + predictor_graph_bytes(cfg)
                lines.append(
                    f"| {micro} | {'checkpointed' if checkpoint else 'plain'} | {kept / 2**20:.2f} MiB | "
                    f"{est_kept / 2**20:.2f} MiB | {est_kept / kept:.3f} | {memory.peak / 2**20:.2f} MiB | "
                    f"{est_peak / 2**20:.2f} MiB | {est_peak / memory.peak:.3f} |"
                )
    g = shape.geometry
    print(
        f"## The closed loop composed: tiny FLUX pipeline ({g.image_tokens} latent + {g.text} text tokens, width "
        f"{R.model_dims(spec.transformer_class, spec.transformer_config)['w']}, {steps} steps, interval 7, warm-up 3: "
        f"{counts['graph_full']} full and {counts['graph_cached']} cached steps in the graph; fp32, CPU)\n"
    )
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("measure", "fit", "report", "compose"))
    parser.add_argument("--out", default="runs/fit_estimate")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--write", action="store_true", help="fit: also write the shipped rules")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"measure": cmd_measure, "fit": cmd_fit, "report": cmd_report, "compose": cmd_compose}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
