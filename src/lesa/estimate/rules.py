"""Per-block rules for FLOPs and activation memory, fitted from measurements (`measure.Measurement`).

A rule is a table of coefficients, one per (stream, unit, dtype): a tensor of a block counts `coefficient x tokens
of the stream x size of the unit x bytes of the dtype`, times the batch. Streams: `img` (latent tokens), `txt` (text
tokens), `joint` (both, as joint attention sees them), `const` (one per sample). Units: the model's widths (`w`
hidden, `f` feed-forward, `h` heads, `d` head dim, `in` / `out` latent channels per token, `text` text-encoder width)
or `1` (a plain element count). Dtypes: `model` (the dtype the model runs in) or a fixed one (e.g. float32 for
modules that keep it, norms' statistics, attention's log-sum-exp).

Fitting (`fit`) classifies every tensor a measurement saw by its shape: which dimension is a token count, and which
width the rest of it is; a coefficient is the (averaged, over the fit measurements) count per token. FLOPs come from
the stream each linear layer was measured to run on (`stream_map`) times its weight size, plus attention
`4 * heads * head_dim * Lq * Lk` per call (forward; the backward of a fused kernel counts 2.5 times that).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from .measure import LAYER_FIELDS, TRUNK_KINDS, Geometry, Measurement

TRUNK = set(TRUNK_KINDS)

STREAMS = ("joint", "img", "txt")
DTYPE_BYTES = {
    "complex128": 16,
    "complex64": 8,
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "bool": 1,
    "uint8": 1,
}
# attention backward of a fused kernel (recompute scores, grad of V, scores, Q, K: 5 matmuls) over its forward (2)
ATTENTION_BACKWARD = 2.5


def model_dims(model_class: str, config: dict[str, Any]) -> dict[str, int]:
    """The widths a rule's units stand for, from a transformer config."""
    h = int(config.get("num_attention_heads", 24))
    d = int(config.get("attention_head_dim", 128))
    w = h * d
    if model_class == "FluxTransformer2DModel":
        inp = int(config.get("in_channels", 64))
        dims = dict(
            f=4 * w, inp=inp, out=int(config.get("out_channels") or inp), text=config.get("joint_attention_dim")
        )
    elif model_class == "QwenImageTransformer2DModel":
        p = int(config.get("patch_size", 2))
        inp = int(config.get("in_channels", 64))
        out = int(config.get("out_channels") or inp) * p * p
        dims = dict(f=4 * w, inp=inp, out=out, text=config.get("joint_attention_dim"))
    elif model_class == "HunyuanVideoTransformer3DModel":
        p, pt = int(config.get("patch_size", 2)), int(config.get("patch_size_t", 1))
        inp = int(config.get("in_channels", 16)) * p * p * pt
        out = int(config.get("out_channels") or config.get("in_channels", 16)) * p * p * pt
        f = int(w * float(config.get("mlp_ratio", 4.0)))
        dims = dict(f=f, inp=inp, out=out, text=config.get("text_embed_dim"))
    elif model_class == "WanTransformer3DModel":
        patch = math.prod(config.get("patch_size", (1, 2, 2)))
        inp = int(config.get("in_channels", 16)) * patch
        out = int(config.get("out_channels") or config.get("in_channels", 16)) * patch
        dims = dict(f=int(config.get("ffn_dim", 4 * w)), inp=inp, out=out, text=config.get("text_dim"))
    else:
        raise ValueError(f"no rules for model class {model_class!r}")
    dims["in"] = dims.pop("inp")
    dims["text"] = int(dims["text"] or 4096)
    return {"w": w, "h": h, "d": d, "1": 1, **dims}


def tokens(geo: Geometry) -> dict[str, int]:
    return {"img": geo.image_tokens, "txt": geo.text, "joint": geo.image_tokens + geo.text, "const": 1}


def _units(per: int, shape: list[int], dims: dict[str, int]) -> tuple[str, float]:
    """A per-token (or per-sample) element count as (unit, count): the feed-forward width when the tensor's last
    dimension is it, else a width it equals, else the first width it is a small multiple of."""
    last = shape[-1] if shape else 1
    w, f = dims["w"], dims["f"]
    if last == f and f != w:
        return "f", per / f
    if last == w + f:
        return "wf", per / (w + f)
    order = ("w", "f", "d", "h", "in", "out", "text")
    for unit in order:
        if per == dims[unit]:
            return unit, 1.0
    if (2 * per) % w == 0:  # whole or half hidden widths (a rotary half of every head)
        return "w", per / w
    for unit in order:
        if per % dims[unit] == 0 and per // dims[unit] <= 16:
            return unit, per / dims[unit]
    return "1", float(per)


def _token_run(shape: list[int], count: int) -> bool:
    """Whether consecutive dimensions of `shape` multiply to `count` (a token count, possibly a flattened grid)."""
    for i in range(len(shape)):
        product = 1
        for size in shape[i:]:
            product *= size
            if product == count and size != 1:
                return True
            if product > count:
                break
    return False


def classify(shape: list[int], dtype: str, nbytes: int, geo: Geometry, dims: dict[str, int], model_dtype: str):
    """(stream, unit, dtype class, count per token of the stream per sample) of one tensor: the stream whose token
    count is one dimension, or a run of dimensions (a video's frames x height x width), of its shape; "const" if
    none is."""
    size = DTYPE_BYTES[dtype]
    numel = nbytes // size
    t = tokens(geo)
    b = geo.batch
    cls = "model" if dtype == model_dtype else dtype
    complex_ = dtype.startswith("complex")  # rotary tables: head_dim / 2 complex numbers per token
    for stream in STREAMS:
        if t[stream] > 1 and _token_run(shape, t[stream]) and numel % (t[stream] * b) == 0:
            per = numel // (t[stream] * b)
            unit, count = ("d", per / dims["d"]) if complex_ else _units(per, shape, dims)
            return stream, unit, cls, count
    per = numel // b if numel % b == 0 else numel
    unit, count = _units(per, shape, dims)
    return "const", unit, cls, count


def tensor_rule(rows: Iterable[list], geo: Geometry, dims: dict[str, int], model_dtype: str) -> dict[str, float]:
    """The coefficients of these tensor rows (label, shape, dtype, bytes, count)."""
    rule: dict[str, float] = defaultdict(float)
    for _, shape, dtype, nbytes, n in rows:
        stream, unit, cls, count = classify(shape, dtype, nbytes, geo, dims, model_dtype)
        rule[f"{stream}:{unit}:{cls}"] += n * count
    return dict(rule)


def rule_bytes(rule, geo: Geometry, dims: dict[str, int], dtype: str = "bfloat16") -> float:
    """Bytes a rule gives at `geo` (batch included) in model dtype `dtype` (a list of rules: the largest)."""
    if isinstance(rule, list):
        return max((rule_bytes(r, geo, dims, dtype) for r in rule), default=0.0)
    t = tokens(geo)
    total = 0.0
    for key, coef in rule.items():
        stream, unit, cls = key.split(":")
        size = dims["w"] + dims["f"] if unit == "wf" else dims[unit]
        total += coef * t[stream] * size * DTYPE_BYTES[dtype if cls == "model" else cls]
    return total * geo.batch


def _stream_of(rows: int, geo: Geometry) -> str:
    t = tokens(geo)
    for stream in STREAMS:
        if rows == t[stream] * geo.batch:
            return stream
    if rows == geo.batch:
        return "const"
    return f"rows:{rows / geo.batch:g}"


def _relative(name: str) -> tuple[str, str]:
    """("transformer_blocks.3", "attn.to_q") for a module inside a block list, ("", name) otherwise."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return "", name


def _undominated(rules: list[dict[str, float]]) -> list[dict[str, float]]:
    """Candidate peaks without duplicates and without those no larger than another in every coefficient."""
    out: list[dict[str, float]] = []
    for r in sorted(rules, key=lambda r: -sum(r.values())):
        keys = set(r)
        if not any(keys <= set(o) and all(r[k] <= o[k] + 1e-9 for k in keys) for o in out):
            out.append(r)
    return out


def _block_kind(name: str, prefixes: dict[str, str]) -> str | None:
    """The kind of the block a module (by name) belongs to, or None outside every block."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        kind = prefixes.get(".".join(parts[:i]))
        if kind is not None:
            return kind
    return None


def _average(rules: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rules for k in r})
    return {k: sum(r.get(k, 0.0) for r in rules) / len(rules) for k in keys}


def _steady(labels: Iterable[str]) -> dict[str, str]:
    """The label of the last block of each kind (its inputs all carry gradients: the steady state)."""
    last: dict[str, str] = {}
    for label in sorted(labels, key=lambda s: (s.split(".")[0], int(s.split(".")[1]) if "." in s else -1)):
        if "." in label:
            last[label.split(".")[0]] = label
    return last


def fit(measurements: list[Measurement]) -> dict[str, Any]:
    """Rules of one transformer class from measurements of it (the same block layout, several geometries): the
    coefficients of each measurement, averaged. Memory is ruled by the block of each kind that keeps the most (the
    steady state: the first double block's text stream carries no gradient yet, the last block's output may be
    dropped by the head), FLOPs by the last block of each kind."""
    model_class = measurements[0].model_class
    per: dict[str, list] = defaultdict(list)
    stream_map: dict[str, dict[str, str]] = defaultdict(dict)
    attention: dict[str, list] = {}
    for m in measurements:
        dims = model_dims(m.model_class, m.config)
        geo = m.geometry
        check_geometry(geo, dims)
        steady = _steady({r[0] for r in m.retained} | {a[0] for a in m.attention})
        for quantity, rows in (("retained", m.retained), ("kept", m.kept_checkpoint)):
            by_label = _by_label(rows)
            for kind in steady:  # the block of the kind that keeps the most (the steady state)
                blocks = [v for k, v in by_label.items() if k.split(".")[0] == kind] or [[]]
                most = max(blocks, key=Measurement.total)
                per[f"{quantity}.{kind}"].append(tensor_rule(most, geo, dims, m.dtype))
            per[f"{quantity}.rest"].append(tensor_rule(by_label.get("rest", []), geo, dims, m.dtype))
        per["retained.cached"].append(tensor_rule(m.retained_cached, geo, dims, m.dtype))
        per["peak_inference"].append(tensor_rule(m.at_peak_inference, geo, dims, m.dtype))
        # the peak inside each trunk block's modules (attention, feed-forward, norms): which of them is the highest
        # depends on the widths; outside the blocks (rotary tables, embedders) shapes follow sizes the units miss
        prefixes = _block_prefixes(m)
        per["peak_inference"] += [
            tensor_rule(rows, geo, dims, m.dtype)
            for name, rows in m.phase_peaks_inference.items()
            if _block_kind(name, prefixes) in TRUNK
        ]
        per["transient_train"].append(tensor_rule(m.transient_train, geo, dims, m.dtype))
        per["transient_checkpoint"].append(tensor_rule(m.transient_checkpoint, geo, dims, m.dtype))
        # the stream of each linear layer: by name relative to the last block of its kind; by full name outside
        prefixes = _block_prefixes(m)
        for name, rows in m.linear_tokens.items():
            prefix, rel = _relative(name)
            kind = prefixes.get(prefix)
            stream = _stream_of(rows, geo)
            if not m.linear_grad.get(name, True):
                stream += "/nograd"  # its input never carries a gradient: no backward matmul
            if kind is None:
                stream_map["rest"][name] = stream
            elif prefix == prefixes[f"last:{kind}"]:
                stream_map[kind][rel] = stream
        calls: dict[str, list] = defaultdict(list)
        for label, q, k in m.attention:
            kind = label.split(".")[0]
            if label == "rest" or label == steady.get(kind):
                calls[kind].append([_stream_of(q[2] * geo.batch, geo), _stream_of(k[2] * geo.batch, geo)])
        attention = attention or dict(calls)
    # the peaks: one candidate per measurement (each caught its peak in some block), the largest one is taken
    peaks = ("peak_inference", "transient_train", "transient_checkpoint")
    rules = {key: _undominated(values) if key in peaks else _average(values) for key, values in per.items()}
    return {"model_class": model_class, "memory": rules, "streams": dict(stream_map), "attention": attention}


def check_geometry(geo: Geometry, dims: dict[str, int]) -> None:
    """Refuse a fit geometry whose token counts collide with each other or a width (shapes would be ambiguous)."""
    counts = [c for s, c in tokens(geo).items() if s != "const"]
    widths = {v for k, v in dims.items() if k != "1"}
    if len(set(counts)) != len(counts) or any(c in widths or c == geo.batch for c in counts):
        raise ValueError(f"fit geometry {geo}: token counts {counts} collide with each other or a width {dims}")


def _by_label(rows: list[list]) -> dict[str, list[list]]:
    out: dict[str, list[list]] = defaultdict(list)
    for row in rows:
        out[row[0]].append(row)
    return out


def _block_prefixes(m: Measurement) -> dict[str, str]:
    """Module path prefix of every trunk block ("transformer_blocks.1") -> its kind, and "last:kind" -> the prefix of
    the last block of that kind, from the layout of `m`'s class."""
    lists = {
        "FluxTransformer2DModel": (("transformer_blocks", "flux_double"), ("single_transformer_blocks", "flux_single")),
        "QwenImageTransformer2DModel": (("transformer_blocks", "qwen_double"),),
        "HunyuanVideoTransformer3DModel": (
            ("transformer_blocks", "hunyuan_double"),
            ("single_transformer_blocks", "hunyuan_single"),
            ("context_embedder.token_refiner.refiner_blocks", "hunyuan_refiner"),
        ),
        "WanTransformer3DModel": (("blocks", "wan"),),
    }[m.model_class]
    counts = dict(zip((k for _, k in LAYER_FIELDS[m.model_class]), m.layers, strict=True))
    if m.model_class == "HunyuanVideoTransformer3DModel":
        counts["hunyuan_refiner"] = int(m.config.get("num_refiner_layers", 2))
    out = {}
    for path, kind in lists:
        for i in range(counts[kind]):
            out[f"{path}.{i}"] = kind
        if counts[kind]:
            out[f"last:{kind}"] = f"{path}.{counts[kind] - 1}"
    return out


def block_flops(
    rules: dict[str, Any], kind: str, params: dict[str, int], geo: Geometry, dims: dict[str, int]
) -> dict[str, float]:
    """Forward FLOPs of one block of `kind` (or "rest") at `geo`: matmuls on their streams (`params`: weight size by
    module name relative to the block, or by full name for "rest") and attention; and its backward (input gradients
    only, frozen weights: one matmul per forward matmul whose input carries a gradient, 2.5x the attention)."""
    t = tokens(geo)
    streams = rules["streams"].get(kind, {})
    matmul = token_matmul = 0.0
    for name, size in params.items():
        stream, _, nograd = streams.get(name, "img").partition("/")
        rows = t[stream] if stream in t else float(stream.split(":")[1]) if stream.startswith("rows:") else 1
        matmul += 2 * size * rows
        token_matmul += 2 * size * rows if not nograd else 0
    attn = sum(4 * dims["h"] * dims["d"] * t[q] * t[k] for q, k in rules["attention"].get(kind, []))
    b = geo.batch
    return {
        "forward": b * (matmul + attn),
        "attention": b * attn,
        "backward": b * (token_matmul + ATTENTION_BACKWARD * attn),
    }


def kind_counts(model_class: str, config: dict[str, Any]) -> dict[str, int]:
    """Blocks of each kind in a config (the Hunyuan token refiner counted as blocks of its own kind)."""
    counts = {kind: int(config.get(name, 0)) for name, kind in LAYER_FIELDS[model_class]}
    if model_class == "HunyuanVideoTransformer3DModel":
        counts["hunyuan_refiner"] = int(config.get("num_refiner_layers", 2))
    return counts


def module_params(model_class: str, config: dict[str, Any]) -> dict[str, Any]:
    """Weight sizes of the transformer `config` describes, built on the meta device (no memory, no weights): one
    block of each kind by module name relative to the block ("kinds"), the rest by full name ("rest"), the block
    counts ("counts") and the parameter total ("total", every block included)."""
    import diffusers
    import torch

    from .measure import _trunk

    counts = kind_counts(model_class, config)
    small = {k: v for k, v in config.items() if not k.startswith("_")}
    for name, _ in LAYER_FIELDS[model_class]:
        small[name] = 1
    if "num_refiner_layers" in small or model_class == "HunyuanVideoTransformer3DModel":
        small["num_refiner_layers"] = 1
    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**small)
    kinds: dict[str, dict[str, int]] = {}
    block_params: dict[str, int] = {}
    inside = set()
    for label, block in _trunk(model):
        kind = label.split(".")[0]
        kinds[kind] = {
            name: m.weight.numel()
            for name, m in block.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        }
        block_params[kind] = sum(p.numel() for p in block.parameters())
        inside.update(id(m) for m in block.modules())
    rest = {
        name: m.weight.numel()
        for name, m in model.named_modules()
        if id(m) not in inside and isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
    }
    in_blocks = {id(p) for label, block in _trunk(model) for p in block.parameters()}
    rest_params = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    total = rest_params + sum(counts.get(k, 0) * n for k, n in block_params.items())
    return {
        "kinds": kinds,
        "rest": rest,
        "counts": counts,
        "block_params": block_params,
        "rest_params": rest_params,
        "total": total,
    }


def predict_call(rules: dict[str, Any], arch: dict[str, Any], geo: Geometry, dims: dict[str, int], dtype: str):
    """One transformer call at `geo` by the rules: forward / backward FLOPs, and activation bytes (weights not
    included): the inference peak, what autograd keeps without and with checkpointing, the training peaks."""
    mem = rules["memory"]
    flops = {"forward": 0.0, "backward": 0.0, "attention": 0.0}
    kept = retained = 0.0
    for kind, n in arch["counts"].items():
        one = block_flops(rules, kind, arch["kinds"].get(kind, {}), geo, dims)
        for key in flops:
            flops[key] += n * one[key]
        retained += n * rule_bytes(mem.get(f"retained.{kind}", {}), geo, dims, dtype)
        kept += n * rule_bytes(mem.get(f"kept.{kind}", {}), geo, dims, dtype)
    one = block_flops(rules, "rest", arch["rest"], geo, dims)
    for key in flops:
        flops[key] += one[key]
    retained += rule_bytes(mem["retained.rest"], geo, dims, dtype)
    kept += rule_bytes(mem["kept.rest"], geo, dims, dtype)
    return {
        "forward_flops": flops["forward"],
        "backward_flops": flops["backward"],
        "attention_flops": flops["attention"],
        "peak_inference": rule_bytes(mem["peak_inference"], geo, dims, dtype),
        "retained": retained,
        "peak_train": retained + rule_bytes(mem["transient_train"], geo, dims, dtype),
        "kept_checkpoint": kept,
        "peak_train_checkpoint": kept + rule_bytes(mem["transient_checkpoint"], geo, dims, dtype),
        "retained_cached": rule_bytes(mem.get("retained.cached", {}), geo, dims, dtype),
    }


def measured_call(m: Measurement) -> dict[str, float]:
    """The quantities `predict_call` gives, as measured."""
    return {
        "forward_flops": sum(m.forward_flops.values()),
        "backward_flops": m.backward_flops,
        "peak_inference": m.peak_inference,
        "retained": Measurement.total(m.retained),
        "peak_train": m.peak_train,
        "kept_checkpoint": Measurement.total(m.kept_checkpoint),
        "peak_train_checkpoint": m.peak_train_checkpoint,
        "retained_cached": Measurement.total(m.retained_cached),
    }
