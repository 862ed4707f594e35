"""Measurements that the estimate's rules are fitted to and checked against (CPU, random weights, no GPU needed).

A diffusers transformer is built from a config with its block counts cut down (`build_transformer`), fed inputs of
a chosen token geometry (`example_inputs`) and run as lesa runs it: a no-grad forward (record, generate), and a
forward + backward with every weight frozen and gradients wanted for the latent input only (the closed loop of
`lesa train`), once plainly and once with every trunk block under gradient checkpointing. Measured:

- FLOPs (`torch.utils.flop_counter`'s formulas; the CPU's fused attention kernel, which the counter leaves at 0, is
  counted with the counter's own attention formula: 4 * B * heads * Lq * Lk * head_dim forward), per block;
- the token count every linear / convolution layer sees (which stream it belongs to: image, text, both, or one row
  per sample) and every attention call's query and key lengths;
- the tensors alive at the end of a forward (what autograd keeps for backward), by the block that created them;
- the tensors alive at the peak of each run (`LiveBytes`: a dispatch mode that follows every op's output storage
  until it is freed; weights and inputs, which exist before, are not counted).
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

aten = torch.ops.aten

# trunk block classes -> rule kind
BLOCK_KINDS = {
    "FluxTransformerBlock": "flux_double",
    "FluxSingleTransformerBlock": "flux_single",
    "QwenImageTransformerBlock": "qwen_double",
    "HunyuanVideoTransformerBlock": "hunyuan_double",
    "HunyuanVideoSingleTransformerBlock": "hunyuan_single",
    "WanTransformerBlock": "wan",
    # not trunk: HunyuanVideo's text-token refiner, which runs on every step (cached ones too)
    "HunyuanVideoIndividualTokenRefinerBlock": "hunyuan_refiner",
}
TRUNK_KINDS = ("flux_double", "flux_single", "qwen_double", "hunyuan_double", "hunyuan_single", "wan")
# config fields holding the block counts, per transformer class, and the block kind each counts
LAYER_FIELDS = {
    "FluxTransformer2DModel": (("num_layers", "flux_double"), ("num_single_layers", "flux_single")),
    "QwenImageTransformer2DModel": (("num_layers", "qwen_double"),),
    "HunyuanVideoTransformer3DModel": (("num_layers", "hunyuan_double"), ("num_single_layers", "hunyuan_single")),
    "WanTransformer3DModel": (("num_layers", "wan"),),
}
ATTENTION_OPS = (
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
)


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# the CPU's fused attention (what F.scaled_dot_product_attention runs on CPU tensors), which torch's FLOP counter
# leaves at 0: `FlopCounterMode(custom_mapping=CPU_ATTENTION_FLOPS)` counts it as the CUDA kernels are counted
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}
# the counter's formulas, plus the CPU's fused attention
FLOP_FORMULAS = {**flop_registry, **{op: shape_wrapper(f) for op, f in CPU_ATTENTION_FLOPS.items()}}


def op_flops(func, args, kwargs, out) -> int:
    formula = FLOP_FORMULAS.get(func.overloadpacket)
    return 0 if formula is None else int(formula(*args, **(kwargs or {}), out_val=out))


@dataclass
class _Storage:
    ref: StorageWeakRef
    nbytes: int
    label: str
    shape: tuple[int, ...]
    dtype: str


class LiveBytes(TorchDispatchMode):
    """Within: the tensors that ops create and that are still alive, by storage (`live` bytes, `peak` bytes and the
    tensors alive at the peak, `at_peak`), and the FLOPs of every op by label (`flops`).

    Views and in-place results share a storage and count once; tensors that existed before (weights, inputs) are not
    counted. The peak is sampled at every op's end, when its inputs and output are both alive (a kernel's own
    workspace is not seen). `label` (a one-element list) names what runs (a trunk block or "rest"); each storage keeps
    the label it was created under, with the shape and dtype of the tensor that created it."""

    def __init__(self, label: list[str] | None = None, phase: list[str] | None = None) -> None:
        super().__init__()
        self.label = label or ["rest"]
        self.phase = phase  # with it: the peak within each phase (a module's name), and the tensors alive then
        self.phase_peaks: dict[str, tuple[int, list[_Storage]]] = {}
        self.storages: dict[int, _Storage] = {}
        self.live = 0
        self.peak = 0
        self.at_peak: list[_Storage] = []
        self.flops: Counter = Counter()
        self.attention: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.sweep()  # what was freed since the last op
        out = func(*args, **(kwargs or {}))
        self.flops[self.label[0]] += op_flops(func, args, kwargs, out)
        if func.overloadpacket in ATTENTION_OPS:
            self.attention.append((self.label[0], tuple(args[0].shape), tuple(args[1].shape)))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs:  # a view or an in-place result: no new memory
                continue
            known = self.storages.get(key)
            if known is None or known.ref.expired():
                if known is not None:
                    self.live -= known.nbytes
                nbytes = storage.nbytes()
                dtype = str(t.dtype).replace("torch.", "")
                self.storages[key] = _Storage(StorageWeakRef(storage), nbytes, self.label[0], tuple(t.shape), dtype)
                self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = list(self.storages.values())
        if self.phase is not None and self.live > self.phase_peaks.get(self.phase[-1], (-1, None))[0]:
            self.phase_peaks[self.phase[-1]] = (self.live, list(self.storages.values()))
        return out

    def sweep(self) -> int:
        for key in [k for k, s in self.storages.items() if s.ref.expired()]:
            self.live -= self.storages.pop(key).nbytes
        return self.live

    def alive(self) -> list[_Storage]:
        self.sweep()
        return list(self.storages.values())


def _keep_fp32(model: torch.nn.Module) -> None:
    """Modules a diffusers class keeps in float32 when loaded in another dtype (`_keep_in_fp32_modules`), as
    `from_pretrained(torch_dtype=...)` leaves them."""
    names = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(part in name.split(".") for part in names):
            module.float()


def build_transformer(
    model_class: str, config: dict[str, Any], layers: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, seed=0
) -> torch.nn.Module:
    """The diffusers transformer `model_class` with `config`, its block counts replaced by `layers` (in the order of
    `LAYER_FIELDS`), random weights in `dtype` (its float32 modules kept in float32), on the CPU, eval mode, every
    weight frozen."""
    import diffusers

    config = {k: v for k, v in copy.deepcopy(config).items() if not k.startswith("_")}
    for (name, _), count in zip(LAYER_FIELDS[model_class], layers, strict=True):
        config[name] = count
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in the dtype: half the memory of an fp32 build and a cast
    try:
        model = getattr(diffusers, model_class)(**config)
    finally:
        torch.set_default_dtype(default)
    model = model.to(dtype).eval()
    if dtype != torch.float32:
        _keep_fp32(model)
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class Geometry:
    """Token geometry of one transformer call: the latent token grid after patching (frames, height, width; frames
    1 for images), the text tokens and the batch."""

    frames: int
    height: int
    width: int
    text: int
    batch: int = 1

    @property
    def image_tokens(self) -> int:
        return self.frames * self.height * self.width


def example_inputs(model_class: str, config: dict[str, Any], geo: Geometry, dtype=torch.bfloat16, seed=0) -> dict:
    """Keyword arguments of one transformer call at `geo` (random values)."""
    g = torch.Generator().manual_seed(seed)
    b = geo.batch

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if model_class == "FluxTransformer2DModel":
        ids = torch.zeros(geo.height, geo.width, 3)
        ids[..., 1] = torch.arange(geo.height)[:, None]
        ids[..., 2] = torch.arange(geo.width)[None, :]
        kwargs = dict(
            hidden_states=rand(b, geo.image_tokens, config["in_channels"]),
            encoder_hidden_states=rand(b, geo.text, config.get("joint_attention_dim", 4096)),
            pooled_projections=rand(b, config.get("pooled_projection_dim", 768)),
            timestep=torch.full((b,), 0.5, dtype=dtype),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(geo.text, 3),
        )
        if config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((b,), 3.5, dtype=dtype)
    elif model_class == "QwenImageTransformer2DModel":
        kwargs = dict(
            hidden_states=rand(b, geo.image_tokens, config["in_channels"]),
            encoder_hidden_states=rand(b, geo.text, config.get("joint_attention_dim", 3584)),
            encoder_hidden_states_mask=torch.ones(b, geo.text, dtype=torch.long),
            timestep=torch.full((b,), 0.5, dtype=dtype),
            img_shapes=[[(geo.frames, geo.height, geo.width)]] * b,
        )
    elif model_class == "HunyuanVideoTransformer3DModel":
        p, pt = config.get("patch_size", 2), config.get("patch_size_t", 1)
        kwargs = dict(
            hidden_states=rand(b, config["in_channels"], geo.frames * pt, geo.height * p, geo.width * p),
            timestep=torch.full((b,), 500.0, dtype=dtype),
            encoder_hidden_states=rand(b, geo.text, config.get("text_embed_dim", 4096)),
            encoder_attention_mask=torch.ones(b, geo.text, dtype=torch.long),
            pooled_projections=rand(b, config.get("pooled_projection_dim", 768)),
        )
        if config.get("guidance_embeds", True):
            kwargs["guidance"] = torch.full((b,), 6000.0, dtype=dtype)
    elif model_class == "WanTransformer3DModel":
        pt, ph, pw = config.get("patch_size", (1, 2, 2))
        kwargs = dict(
            hidden_states=rand(b, config["in_channels"], geo.frames * pt, geo.height * ph, geo.width * pw),
            timestep=torch.full((b,), 500.0, dtype=dtype),
            encoder_hidden_states=rand(b, geo.text, config.get("text_dim", 4096)),
        )
    else:
        raise ValueError(f"no example inputs for {model_class}")
    kwargs["return_dict"] = False
    return kwargs


def _tensors(storages: list[_Storage]) -> list[list]:
    """(label, shape, dtype, bytes, count) rows, identical tensors merged."""
    rows = Counter((s.label, s.shape, s.dtype, s.nbytes) for s in storages)
    return [[label, list(shape), dtype, nbytes, n] for (label, shape, dtype, nbytes), n in sorted(rows.items())]


@dataclass
class Measurement:
    """What one configuration measured; tensor lists are rows (label, shape, dtype, bytes, count) where label is a
    trunk block ("flux_double.1": the second block of that kind) or "rest" (embedders, head)."""

    model_class: str
    config: dict[str, Any]
    geometry: Geometry
    dtype: str
    layers: tuple[int, ...]
    params: dict[str, int]  # parameters of one block of each kind, and of the rest
    linear_tokens: dict[str, int]  # rows each linear / convolution layer saw (by module name), no-grad forward
    linear_params: dict[str, int]  # its weight's size
    linear_grad: dict[str, bool]  # whether its input carried a gradient (forward with autograd)
    attention: list  # (label, query shape, key shape) of every attention call, no-grad forward
    forward_flops: dict[str, int]  # by label
    backward_flops: int  # the whole backward (gradients of the latent input only)
    peak_inference: int  # peak live bytes of a no-grad forward (weights and inputs not counted)
    at_peak_inference: list  # the tensors alive then
    phase_peaks_inference: dict  # module name -> the tensors alive at its peak (modules within half the peak)
    retained: list  # tensors alive at the end of a forward with autograd, by creating label
    peak_train: int  # peak live bytes of forward + backward
    transient_train: list  # the tensors alive at that peak that were not alive at the end of the forward
    kept_checkpoint: list  # tensors alive at the end of a forward with every block checkpointed
    retained_cached: list  # tensors alive after a cached call with autograd (trunk skipped, forecast at the tap)
    peak_train_checkpoint: int
    transient_checkpoint: list
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["geometry"] = asdict(self.geometry)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        data = dict(data)
        data.setdefault("linear_grad", {})  # measured before it was recorded: every layer counted in backward
        data.setdefault("retained_cached", [])
        data.setdefault("phase_peaks_inference", {})
        data["geometry"] = Geometry(**data["geometry"])
        data["layers"] = tuple(data["layers"])
        return cls(**data)

    @staticmethod
    def total(rows: list) -> int:
        return sum(r[3] * r[4] for r in rows)


def _trunk(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(label, block) of every trunk block: "kind.i" for the i-th block of that kind."""
    seen: Counter = Counter()
    out = []
    for m in model.modules():
        kind = BLOCK_KINDS.get(type(m).__name__)
        if kind is not None:
            out.append((f"{kind}.{seen[kind]}", m))
            seen[kind] += 1
    return out


@contextlib.contextmanager
def _labelled(model: torch.nn.Module) -> Iterator[list[str]]:
    """Within: label[0] is the label of the trunk block whose forward runs, else "rest"."""
    label = ["rest"]
    handles = []
    for name, block in _trunk(model):
        handles.append(block.register_forward_pre_hook(lambda *_, n=name: label.__setitem__(0, n)))
        handles.append(block.register_forward_hook(lambda *_: label.__setitem__(0, "rest")))
    try:
        yield label
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _checkpointed(model: torch.nn.Module) -> Iterator[None]:
    """Within: every trunk block runs under non-reentrant gradient checkpointing (as lesa's TrunkBlockHook runs it)."""
    originals = []
    for _, block in _trunk(model):
        original = block.forward
        originals.append((block, original))

        def forward(*args, _f=original, **kwargs):
            return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    try:
        yield
    finally:
        for block, _ in originals:
            del block.forward  # the class's forward again (a bound method stored back would be a reference cycle)


@contextlib.contextmanager
def _phases(model: torch.nn.Module) -> Iterator[list[str]]:
    """Within: phase[-1] is the name of the innermost module whose forward runs (a stack)."""
    phase = ["(model)"]

    def leave(*_) -> None:  # a forward hook must return None (anything else replaces the module's output)
        phase.pop()

    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(lambda *_, n=name: phase.append(n)))
            handles.append(m.register_forward_hook(leave))
    try:
        yield phase
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def skipped_trunk(model: torch.nn.Module) -> Iterator[None]:
    """Within: every trunk block returns its inputs (as lesa's runtime runs a cached step)."""
    import inspect

    from ..adapters import get_adapter

    adapter = get_adapter(model)
    blocks = [block for _, block in adapter.trunk_blocks(model)]
    for block in blocks:
        params = list(inspect.signature(block.forward).parameters)

        def skip(*args, _params=params, **kwargs):
            named = dict(zip(_params, args, strict=False)) | kwargs
            returns = adapter.block_returns
            return named[returns[0]] if len(returns) == 1 else tuple(named[n] for n in returns)

        block.forward = skip
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@contextlib.contextmanager
def forecast_at_tap(model: torch.nn.Module) -> Iterator[None]:
    """Within: the tapped feature is replaced by a new tensor that carries a gradient (the predictor's forecast on a
    cached step, which the head runs on)."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    tap = model.get_submodule(adapter.tap_module)

    def forecast(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1)).requires_grad_(True)

    if adapter.tap_point == "input":
        handle = tap.register_forward_pre_hook(
            lambda mod, args, kwargs: ((forecast(args[0]), *args[1:]), kwargs), with_kwargs=True
        )
    else:
        handle = tap.register_forward_hook(lambda mod, args, out: forecast(out))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _linear_tokens(model: torch.nn.Module) -> Iterator[tuple[dict[str, int], dict[str, int], dict[str, bool]]]:
    """Within: by module name, the rows each Linear / Conv layer computes (batch x tokens), its weight's size and
    whether its input carries a gradient (then its backward computes one: frozen weights, input gradients only)."""
    tokens: dict[str, int] = {}
    params: dict[str, int] = {}
    grad: dict[str, bool] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            params[name] = m.weight.numel()

            def hook(mod, args, out, _name=name):
                channels = out.shape[-1] if isinstance(mod, torch.nn.Linear) else out.shape[1]
                tokens[_name] = tokens.get(_name, 0) + out.numel() // channels
                grad[_name] = grad.get(_name, False) or bool(args and args[0].requires_grad)

            handles.append(m.register_forward_hook(hook))
    try:
        yield tokens, params, grad
    finally:
        for h in handles:
            h.remove()


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def measure(
    model_class: str, config: dict[str, Any], layers: tuple[int, ...], geo: Geometry, dtype=torch.bfloat16
) -> Measurement:
    """Build the transformer and measure one call at `geo` (see the module docstring)."""
    import time

    start = time.perf_counter()
    gc.collect()
    model = build_transformer(model_class, config, layers, dtype)
    params: dict[str, int] = {}
    in_blocks = set()
    for name, block in _trunk(model):
        params[name.split(".")[0]] = sum(p.numel() for p in block.parameters())
        in_blocks.update(id(p) for p in block.parameters())
    params["rest"] = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)

    def inputs():
        kwargs = example_inputs(model_class, config, geo, dtype)
        kwargs["hidden_states"].requires_grad_(True)
        return kwargs

    with _labelled(model) as label:
        # inference: FLOPs, streams, attention calls, peak
        with torch.no_grad(), _linear_tokens(model) as (tokens, linear_params, _), _phases(model) as phase:
            kwargs = inputs()
            tracker = LiveBytes(label, phase)
            with tracker:
                model(**kwargs)
        inference = tracker
        # the peak of each module's run that comes within half of the overall peak: where the peak is depends on the
        # widths (feed-forward or attention), so each is a candidate for other widths
        phase_peaks = {
            name: _tensors(st) for name, (live, st) in inference.phase_peaks.items() if live >= 0.5 * inference.peak
        }
        # training, no checkpointing: what autograd keeps, the run's peak (forward or backward) and backward FLOPs
        kwargs = inputs()
        tracker = LiveBytes(label)
        with tracker, _linear_tokens(model) as (_, _, linear_grad):
            out = _first(model(**kwargs))
            retained = tracker.alive()
            label[0] = "backward"
            out.backward(torch.randn_like(out))
            label[0] = "rest"
        backward_flops = tracker.flops["backward"]
        peak_train = tracker.peak
        kept_keys = {id(s) for s in retained}
        transient_train = [s for s in tracker.at_peak if id(s) not in kept_keys]
        del out, kwargs
        # training, every block checkpointed
        kwargs = inputs()
        tracker = LiveBytes(label)
        with _checkpointed(model), tracker:
            out = _first(model(**kwargs))
            kept = tracker.alive()
            label[0] = "backward"
            out.backward(torch.randn_like(out))
            label[0] = "rest"
        kept_keys = {id(s) for s in kept}
        transient_ckpt = [s for s in tracker.at_peak if id(s) not in kept_keys]
        peak_ckpt = tracker.peak
        del out, kwargs
        # a cached step of the closed loop: the trunk skipped, the head on a forecast that carries a gradient; what
        # autograd keeps once the call's output has been consumed
        kwargs = inputs()
        tracker = LiveBytes(label)
        with skipped_trunk(model), forecast_at_tap(model), tracker:
            out = _first(model(**kwargs))
            graph = out.grad_fn  # what the rest of the sampler holds on to; the output itself is consumed
            del out
            retained_cached = tracker.alive()
            del graph
    return Measurement(
        model_class=model_class,
        config=json_config(config),
        geometry=geo,
        dtype=str(dtype).replace("torch.", ""),
        layers=tuple(layers),
        params=params,
        linear_tokens=tokens,
        linear_params=linear_params,
        linear_grad=linear_grad,
        attention=[[lab, list(q), list(k)] for lab, q, k in inference.attention],
        forward_flops=dict(inference.flops),
        backward_flops=backward_flops,
        peak_inference=inference.peak,
        at_peak_inference=_tensors(inference.at_peak),
        phase_peaks_inference=phase_peaks,
        retained=_tensors(retained),
        peak_train=peak_train,
        transient_train=_tensors(transient_train),
        kept_checkpoint=_tensors(kept),
        retained_cached=_tensors(retained_cached),
        peak_train_checkpoint=peak_ckpt,
        transient_checkpoint=_tensors(transient_ckpt),
        seconds=time.perf_counter() - start,
    )


def json_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
