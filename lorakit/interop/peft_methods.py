"""Per method, how a lorakit adapter layer maps onto PEFT's tensors and config fields (and back).

LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024): ``lora_A = A (r, in)``, ``lora_B = B (out, r)``, scale
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), DoRA's magnitude ``lora_magnitude_vector``.
LoHa (Hyeon-Woo et al. 2022): ``hada_w1_a = B1``, ``hada_w1_b = A1``, ``hada_w2_a = B2``, ``hada_w2_b = A2``.
LoKr (Yeh et al. 2024): ``lokr_w1[_a|_b]``, ``lokr_w2[_a|_b]``; both libraries choose the same factorisation
and the same low-rank/full split from ``r``, ``decompose_both`` and ``decompose_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lorakit.api import AdapterInfo
from lorakit.core.layer import AdaptedLayer


def _is_conv(layer: AdaptedLayer) -> bool:
    return layer.kind.name.startswith("conv") and layer.kind.name != "conv1d_gpt2"


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT ``peft_type``: which lorakit variants it holds and how their tensors are named."""

    peft_type: str
    variants: tuple[str, ...]
    marker: str  # what every adapter key of this method contains, e.g. ".lora_"
    names: dict[str, str] = field(default_factory=dict)  # lorakit parameter -> PEFT key suffix

    def config(self, state: AdapterInfo, layers: list[AdaptedLayer], rank: int) -> dict[str, Any]:
        """The method's own fields of ``adapter_config.json``."""
        shared = {"r": rank, "alpha": state.config.alpha, "rank_dropout": 0.0, "module_dropout": 0.0}
        shared |= {"use_effective_conv2d": False, "init_weights": True}
        if self.peft_type == "LOKR":
            shared |= {"decompose_both": state.config.decompose_both, "decompose_factor": state.config.factor}
        return shared

    def variant_options(self, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The lorakit variant and its settings for a PEFT config of this method."""
        options: dict[str, Any] = {"rank": int(config["r"]), "alpha": float(config["alpha"]), "dropout": 0.0}
        if self.peft_type == "LOKR":
            options |= {"decompose_both": bool(config.get("decompose_both")),
                        "factor": int(config.get("decompose_factor", -1))}  # fmt: skip
        return self.variants[0], options

    def tensors(self, key: str, layer: AdaptedLayer, rank: int) -> dict[str, Tensor]:
        """One layer's tensors under PEFT's names and in PEFT's shapes."""
        found = {}
        for name, p in layer.variant.named_parameters(recurse=False):
            t = p.detach()
            if name == "W2" and _is_conv(layer):  # a full LoKr W2 of a convolution is a kernel in PEFT
                t = t.reshape(t.shape[0], -1, *layer.base_layer.weight.shape[2:])
            found[f"{key}.{self.names[name]}"] = t
        return found

    def fill(self, layer: AdaptedLayer, tensors: dict[str, Tensor], key: str) -> None:
        """Copy one layer's PEFT tensors into the freshly applied lorakit variant."""
        ours = dict(layer.variant.named_parameters(recurse=False))
        theirs = {k[len(key) + 1 :] for k in tensors if k.startswith(key + ".") and self.marker in k}
        if theirs != {self.names[n] for n in ours}:
            raise ValueError(
                f"{key}: the file holds {sorted(theirs)} but these settings give "
                f"{sorted(self.names[n] for n in ours)}; the factorisation does not match"
            )
        for name, p in ours.items():
            _copy(p, tensors[f"{key}.{self.names[name]}"], key)


class LoRAMethod(PeftMethod):
    """LoRA's layout: embeddings use ``lora_embedding_A/B``, convolutions a kernel and a 1x1 convolution."""

    def config(self, state: AdapterInfo, layers: list[AdaptedLayer], rank: int) -> dict[str, Any]:
        cfg = state.config
        return {
            "fan_in_fan_out": all(layer.kind.name == "conv1d_gpt2" for layer in layers),
            "bias": "none",
            "r": rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": bool(getattr(cfg, "rslora", False)),
            "use_dora": state.variant == "dora",
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def variant_options(self, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        options = {
            "rank": int(config["r"]),
            "alpha": float(config["lora_alpha"]),
            "dropout": float(config.get("lora_dropout") or 0.0),
            "rslora": bool(config.get("use_rslora")),
        }
        return ("dora" if config.get("use_dora") else "lora"), options

    def tensors(self, key: str, layer: AdaptedLayer, rank: int) -> dict[str, Tensor]:
        v, weight = layer.variant, layer.base_layer.weight
        a, b = v.A.detach()[:rank], v.B.detach()[:, :rank]  # (r, in), (out, r); DyLoRA truncated to its rank
        spatial = [1] * (weight.dim() - 2) if _is_conv(layer) else []
        if layer.kind.name == "embedding":
            found = {f"{key}.lora_embedding_A": a, f"{key}.lora_embedding_B": b}
        elif spatial:  # a convolution like the base, then a 1x1 convolution
            found = {f"{key}.lora_A.weight": a.reshape(rank, *weight.shape[1:]),
                     f"{key}.lora_B.weight": b.reshape(*b.shape, *spatial)}  # fmt: skip
        else:
            found = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
        if hasattr(v, "m"):  # DoRA's magnitude (out,); PEFT keeps (1, out, 1, ...) for convolutions
            m = v.m.detach()
            found[f"{key}.lora_magnitude_vector"] = m.reshape(1, -1, *spatial) if spatial else m
        return found

    def fill(self, layer: AdaptedLayer, tensors: dict[str, Tensor], key: str) -> None:
        v = layer.variant
        embedding = layer.kind.name == "embedding"
        _copy(v.A, tensors[f"{key}.lora_embedding_A" if embedding else f"{key}.lora_A.weight"], key)
        _copy(v.B, tensors[f"{key}.lora_embedding_B" if embedding else f"{key}.lora_B.weight"], key)
        if hasattr(v, "m"):
            magnitude = tensors.get(f"{key}.lora_magnitude_vector")
            if magnitude is None:
                raise ValueError(f"{key}: use_dora is set but the file has no lora_magnitude_vector here")
            _copy(v.m, magnitude, key)


def _copy(param: Tensor, value: Tensor, key: str) -> None:
    if value.numel() != param.numel():
        raise ValueError(
            f"{key}: a saved tensor of shape {tuple(value.shape)} does not fit {tuple(param.shape)}"
        )
    param.copy_(value.reshape(param.shape))


METHODS = (
    # DyLoRA is written at its chosen rank; QLoRA's factors without its 4-bit base.
    LoRAMethod("LORA", ("lora", "lora_fa", "lora_plus", "qlora", "dora", "dylora"), ".lora_"),
    PeftMethod(
        "LOHA",
        ("loha",),
        ".hada_",
        {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b"},
    ),  # fmt: skip
    PeftMethod(
        "LOKR",
        ("lokr",),
        ".lokr_",
        {
            "W1": "lokr_w1",
            "W1a": "lokr_w1_a",
            "W1b": "lokr_w1_b",
            "W2": "lokr_w2",
            "W2a": "lokr_w2_a",
            "W2b": "lokr_w2_b",
        },
    ),  # fmt: skip
)
