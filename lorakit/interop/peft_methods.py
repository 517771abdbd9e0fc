"""Per method, how a lorakit adapter layer maps onto PEFT's tensors and config fields (and back).

LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024): ``lora_A = A (r, in)``, ``lora_B = B (out, r)``, scale
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), DoRA's magnitude ``lora_magnitude_vector``.
LoHa (Hyeon-Woo et al. 2022): ``hada_w1_a = B1``, ``hada_w1_b = A1``, ``hada_w2_a = B2``, ``hada_w2_b = A2``.
VeRA (Kopiczko et al. 2024): ``vera_lambda_b``, ``vera_lambda_d`` and the shared ``vera_A``, ``vera_B``.
LoKr (Yeh et al. 2024): ``lokr_w1[_a|_b]``, ``lokr_w2[_a|_b]``. With the default ``decompose_factor`` -1 both
libraries choose the same factorisation and low-rank/full split; with an explicit factor PEFT keeps
``(factor, dim / factor)`` where lorakit (like LyCORIS) puts the smaller number first, so such layers are
refused when they differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from lorakit.api import AdapterInfo
from lorakit.core.layer import AdaptedLayer
from lorakit.io import AdapterFileError


def _kernel(layer: AdaptedLayer) -> tuple[int, ...]:
    """A convolution's kernel shape; ``()`` for the matrix kinds and embeddings."""
    if layer.kind.name.startswith("conv") and layer.kind.name != "conv1d_gpt2":
        return tuple(layer.base_layer.weight.shape[2:])
    return ()


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT ``peft_type``: the lorakit variants it holds and how their tensors are named and shaped."""

    peft_type: str
    variants: tuple[str, ...]
    marker: str  # what every adapter key of this method contains, e.g. ".lora_"
    kinds: frozenset[str]  # the lorakit layer kinds PEFT implements this method for
    names: dict[str, str] = field(default_factory=dict)  # lorakit parameter -> PEFT key suffix
    shared_keys: ClassVar[tuple[str, ...]] = ()  # keys outside every layer, read and written whole

    def config(self, state: AdapterInfo, layers: list[AdaptedLayer], rank: int) -> dict[str, Any]:
        """The method's own fields of ``adapter_config.json``."""
        fields = {"r": rank, "alpha": state.config.alpha, "rank_dropout": 0.0, "module_dropout": 0.0}
        fields |= {"use_effective_conv2d": False, "init_weights": True}
        if self.peft_type == "LOKR":
            fields |= {"decompose_both": state.config.decompose_both, "decompose_factor": state.config.factor}
        return fields

    def shared_tensors(self, layers: list[AdaptedLayer]) -> dict[str, Tensor]:
        """Tensors every layer shares, under their full PEFT keys (VeRA's projections); none here."""
        return {}

    def fill_shared(self, layers: list[AdaptedLayer], tensors: dict[str, Tensor]) -> None:
        """Copy the shared tensors of the file into the applied adapter; none here."""

    def variant_options(
        self, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[str, dict[str, Any]]:
        """The lorakit variant and its settings for a PEFT config of this method."""
        options: dict[str, Any] = {"rank": int(config["r"]), "alpha": float(config["alpha"]), "dropout": 0.0}
        if self.peft_type == "LOKR":
            options |= {"decompose_both": bool(config.get("decompose_both")),
                        "factor": int(config.get("decompose_factor", -1))}  # fmt: skip
        return self.variants[0], options

    def check_export(self, name: str, layer: AdaptedLayer) -> None:
        """Refuse a layer PEFT cannot load as this method."""
        if layer.kind.name not in self.kinds:
            raise ValueError(
                f"{name}: PEFT's {self.peft_type} has no {layer.kind.name} layers (only {sorted(self.kinds)})"
            )
        factor = getattr(layer.variant.config, "factor", -1)
        in_channels = layer.in_features // math.prod(_kernel(layer))
        for dim in (layer.out_features, in_channels) if factor > 0 else ():
            if dim % factor == 0 and factor > dim // factor:
                raise ValueError(
                    f"{name}: with factor {factor} PEFT splits {dim} as ({factor}, {dim // factor}) and "
                    f"lorakit as ({dim // factor}, {factor}); PEFT could not load it. Use factor "
                    f"{dim // factor} or -1."
                )

    def params(self, layer: AdaptedLayer) -> dict[str, nn.Parameter]:
        """PEFT key suffix -> the lorakit parameter it holds, for one layer."""
        return {self.names[n]: p for n, p in layer.variant.named_parameters(recurse=False)}

    def to_peft(self, layer: AdaptedLayer, suffix: str, t: Tensor, rank: int) -> Tensor:
        """A lorakit tensor in PEFT's shape: a full LoKr ``W2`` of a convolution is a kernel there."""
        kernel = _kernel(layer)
        return t.reshape(t.shape[0], -1, *kernel) if suffix == "lokr_w2" and kernel else t

    def tensors(self, key: str, layer: AdaptedLayer, rank: int) -> dict[str, Tensor]:
        """One layer's tensors under PEFT's names and in PEFT's shapes."""
        return {f"{key}.{s}": self.to_peft(layer, s, p.detach(), rank) for s, p in self.params(layer).items()}

    def fill(self, layer: AdaptedLayer, tensors: dict[str, Tensor], key: str) -> None:
        """Copy one layer's PEFT tensors into the freshly applied lorakit variant, checking they all fit."""
        params = self.params(layer)
        found = {k[len(key) + 1 :] for k in tensors if k.startswith(key + ".")}
        found -= {s for s in found if s.startswith("base_layer.")}
        if found != set(params):
            raise AdapterFileError(
                f"{key}: the file holds {sorted(found)} where lorakit's {self.peft_type} expects "
                f"{sorted(params)}; other tensors belong to methods lorakit does not read, and other "
                "factors to a different factorisation"
            )
        for suffix, param in params.items():
            value = tensors[f"{key}.{suffix}"]
            # exactly the shape PEFT gives the tensor: a transposed factor has as many elements but is wrong
            expected = self.to_peft(layer, suffix, param.detach(), layer.variant.config.rank).shape
            if value.shape != expected:
                shapes = f"{tuple(value.shape)} is not PEFT's {tuple(expected)} for this layer"
                raise AdapterFileError(f"{key}.{suffix}: the saved tensor's shape {shapes}")
            param.copy_(value.reshape(param.shape))


class LoRAMethod(PeftMethod):
    """LoRA's layout: embeddings use ``lora_embedding_A/B``, convolutions a kernel and a 1x1 convolution."""

    def config(self, state: AdapterInfo, layers: list[AdaptedLayer], rank: int) -> dict[str, Any]:
        cfg = state.config
        return {
            "r": rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": bool(getattr(cfg, "rslora", False)),
            "use_dora": state.variant == "dora",
            "fan_in_fan_out": all(layer.kind.name == "conv1d_gpt2" for layer in layers),
            "bias": "none",
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def variant_options(
        self, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[str, dict[str, Any]]:
        options = {
            "rank": int(config["r"]),
            "alpha": float(config["lora_alpha"]),
            "dropout": float(config.get("lora_dropout") or 0.0),
            "rslora": bool(config.get("use_rslora")),
        }
        return ("dora" if config.get("use_dora") else "lora"), options

    def params(self, layer: AdaptedLayer) -> dict[str, nn.Parameter]:
        v = layer.variant
        if layer.kind.name == "embedding":
            found = {"lora_embedding_A": v.A, "lora_embedding_B": v.B}
        else:
            found = {"lora_A.weight": v.A, "lora_B.weight": v.B}
        if hasattr(v, "m"):
            found["lora_magnitude_vector"] = v.m
        return found

    def to_peft(self, layer: AdaptedLayer, suffix: str, t: Tensor, rank: int) -> Tensor:
        kernel = _kernel(layer)
        ones = [1] * len(kernel)
        if suffix.startswith("lora_A") or suffix == "lora_embedding_A":  # (r, in); DyLoRA: its first r rows
            t = t[:rank]
            return t.reshape(rank, -1, *kernel) if kernel else t  # a convolution like the base
        if suffix.startswith("lora_B") or suffix == "lora_embedding_B":  # (out, r)
            t = t[:, :rank]
            return t.reshape(*t.shape, *ones) if kernel else t  # a 1x1 convolution
        return t.reshape(1, -1, *ones) if kernel else t  # DoRA's magnitude: (1, out, 1, ...) for convolutions


class VeRAMethod(PeftMethod):
    """VeRA (Kopiczko et al. 2024): per layer ``vera_lambda_b = b``, ``vera_lambda_d = d``; the shared frozen
    projections are ``base_model.vera_A (r, in_max)`` and ``vera_B (out_max, r)``, drawn by both libraries
    from the same seed with the same generator calls (so equal bit for bit), and saved anyway."""

    shared_keys: ClassVar[tuple[str, ...]] = ("base_model.vera_A", "base_model.vera_B")

    def config(self, state: AdapterInfo, layers: list[AdaptedLayer], rank: int) -> dict[str, Any]:
        cfg = state.config
        return {"r": rank, "projection_prng_key": cfg.projection_seed, "save_projection": True,
                "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial, "bias": "none",
                "fan_in_fan_out": all(layer.kind.name == "conv1d_gpt2" for layer in layers)}  # fmt: skip

    def variant_options(
        self, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[str, dict[str, Any]]:
        options = {"rank": int(config["r"]), "dropout": float(config.get("vera_dropout") or 0.0),
                   "d_initial": float(config.get("d_initial", 0.1)),
                   "projection_seed": int(config.get("projection_prng_key", 0))}  # fmt: skip
        a, b = (tensors.get(k) for k in self.shared_keys)
        if a is not None and b is not None:
            options["projection_shape"] = [int(b.shape[0]), int(a.shape[1])]
        return "vera", options

    def params(self, layer: AdaptedLayer) -> dict[str, nn.Parameter]:
        return {"vera_lambda_b": layer.variant.b, "vera_lambda_d": layer.variant.d}

    def shared_tensors(self, layers: list[AdaptedLayer]) -> dict[str, Tensor]:
        v = layers[0].variant
        return {self.shared_keys[0]: v.A.detach(), self.shared_keys[1]: v.B.detach()}

    def fill_shared(self, layers: list[AdaptedLayer], tensors: dict[str, Tensor]) -> None:
        v = layers[0].variant
        for key, param in zip(self.shared_keys, (v.A, v.B), strict=True):
            if key in tensors:  # without save_projection the seed alone rebuilt them
                if tensors[key].shape != param.shape:
                    shape = tuple(tensors[key].shape)
                    raise AdapterFileError(f"{key}: shape {shape} is not {tuple(param.shape)}")
                param.copy_(tensors[key])


MATRIX_AND_CONV = frozenset({"linear", "conv1d", "conv2d"})
METHODS = (
    # DyLoRA is written at its chosen rank; QLoRA's factors without its 4-bit base.
    LoRAMethod(
        "LORA",
        ("lora", "lora_fa", "lora_plus", "qlora", "dora", "dylora"),
        ".lora_",
        frozenset({"linear", "conv1d_gpt2", "conv1d", "conv2d", "conv3d", "embedding"}),
    ),
    PeftMethod(
        "LOHA",
        ("loha",),
        ".hada_",
        MATRIX_AND_CONV,
        {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b"},
    ),
    PeftMethod(
        "LOKR",
        ("lokr",),
        ".lokr_",
        MATRIX_AND_CONV,
        {
            "W1": "lokr_w1",
            "W1a": "lokr_w1_a",
            "W1b": "lokr_w1_b",
            "W2": "lokr_w2",
            "W2a": "lokr_w2_a",
            "W2b": "lokr_w2_b",
        },
    ),
    VeRAMethod("VERA", ("vera",), ".vera_lambda_", frozenset({"linear", "conv1d_gpt2"})),
)
