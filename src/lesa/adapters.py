"""Per-model knowledge, and nothing else: where the trunk is and which tensor is tapped.

Adding a model is one `ModelAdapter(...)` entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """How LESA attaches to one diffusers transformer class.

    trunk: names of the `nn.ModuleList`s whose blocks are skipped on cached steps.
    block_returns: what each trunk block returns, in order (a skipped block returns its inputs in this order).
    tap_module / tap_point: the tapped feature is the `hidden_states` input ("input") or the output ("output") of
        this submodule; on cached steps it is replaced by the forecast, and everything after it runs as usual.
    timestep_scale: sigma = timestep argument / timestep_scale (the transformer's own convention).
    modulation: the first trunk block's timestep-modulated norm, called as `norm(hidden_states, emb=temb)` with the
        block's `hidden_states` and `modulation_argument` inputs, first returned tensor (TeaCache's cheap probe);
        None where TeaCache is not supported.
    """

    model_class: str
    trunk: tuple[str, ...]
    block_returns: tuple[str, ...]
    tap_module: str
    tap_point: str
    tap: str
    timestep_argument: str = "timestep"
    timestep_scale: float = 1.0
    latent_argument: str = "hidden_states"
    modulation: str | None = None
    modulation_argument: str = "temb"

    def trunk_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = []
        for name in self.trunk:
            module_list = getattr(model, name)
            blocks += [(f"{name}.{i}", block) for i, block in enumerate(module_list)]
        return blocks


FLUX = ModelAdapter(
    model_class="FluxTransformer2DModel",
    trunk=("transformer_blocks", "single_transformer_blocks"),
    block_returns=("encoder_hidden_states", "hidden_states"),
    tap_module="norm_out",
    tap_point="input",
    tap="image-token hidden state after the last single-stream block, before norm_out",
    timestep_scale=1.0,  # the pipeline passes sigma in [0, 1]; the model multiplies by 1000 itself
    modulation="norm1",
)

ADAPTERS: dict[str, ModelAdapter] = {a.model_class: a for a in (FLUX,)}


def get_adapter(model: nn.Module | str) -> ModelAdapter:
    """The adapter for a transformer (or its class name); a clear error lists the supported classes."""
    name = model if isinstance(model, str) else type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"model class {name!r} is not supported by lesa; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]
