"""Per PEFT method, how a lorakit adapter layer maps onto PEFT's tensors and config fields (and back).

Which variant is which method, its tensors' PEFT names and its own config fields come from the variant
(``Variant.peft``, a :class:`lorakit.core.contract.PeftSpec`); this file holds each method's layout.

LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024): ``lora_A = A (r, in)``, ``lora_B = B (out, r)``, scale
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), DoRA's magnitude ``lora_magnitude_vector``.
LoHa (Hyeon-Woo et al. 2022): ``hada_w1_a = B1``, ``hada_w1_b = A1``, ``hada_w2_a = B2``, ``hada_w2_b = A2``.
VeRA (Kopiczko et al. 2024): ``vera_lambda_b``, ``vera_lambda_d`` and the shared ``vera_A``, ``vera_B``.
LoKr (Yeh et al. 2024): ``lokr_w1[_a|_b]``, ``lokr_w2[_a|_b]``. With the default ``decompose_factor`` -1 both
libraries choose the same factorisation and low-rank/full split; with an explicit factor PEFT keeps
``(factor, dim / factor)`` where lorakit (like LyCORIS) puts the smaller number first, so such layers are
refused when they differ.

Layers PEFT computes differently from lorakit are refused both ways (:meth:`PeftMethod.layer_problem`: the
variant's own reasons, ``Variant.peft_problem``, then the method's), as the files would load without error
into a model that computes something else:

- a convolution that pads with ``padding_mode`` other than ``'zeros'`` (and a nonzero padding): PEFT convolves
  the adapter's input with zero padding in every method (LoRA's ``lora_A`` is a fresh ``nn.ConvNd`` with the
  default mode, LoHa and LoKr call ``F.convNd`` with the base's padding), lorakit pads it as the base does;
- LoRA and DoRA on a dilated convolution (dilation above 1 along a kernel dimension above 1): PEFT's
  ``lora_A`` has the base's kernel, stride and padding but no dilation, so its output does not line up with
  the base's;
- LoKr on a ``Conv1d`` whose ``W2`` is stored whole ``(b, d, k)``: PEFT's ``make_kron`` gives ``W1`` the extra
  dimensions for a 4-D ``W2`` only, so for a 3-D one ``torch.kron`` lays the same tensors out as another
  weight. It agrees only where the product is trivial along both sides (``a`` or ``b`` is 1, and ``c`` or
  ``d`` is 1); a low-rank ``W2`` is a matrix, which both read alike.

Stride, ``padding='same'`` (without dilation), groups (LoHa, LoKr; the LoRA family adapts no grouped
convolution) and ``Conv3d`` (LoRA, DoRA) compute the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from lorakit.adapters.api import AdapterInfo
from lorakit.adapters.io import AdapterFileError
from lorakit.common.errors import LorakitError
from lorakit.core.contract import PeftSpec
from lorakit.core.kinds import CONV1D_GPT2, FACTOR_KINDS, KINDS, LINEAR, KindSet
from lorakit.core.layer import AdaptedLayer
from lorakit.variants import VARIANTS


def _kernel(layer: AdaptedLayer) -> tuple[int, ...]:
    """A convolution's kernel shape; ``()`` for the matrix kinds and embeddings."""
    return layer.kind.kernel_shape(layer.base_layer)


def _spec(layer: AdaptedLayer) -> PeftSpec:
    spec = type(layer.variant).peft
    assert spec is not None, "only variants with a PEFT spec reach a PEFT method"
    return spec


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT ``peft_type``: its key marker, the layer kinds PEFT implements it for, and its layout."""

    peft_type: str
    marker: str  # what every adapter key of this method contains, e.g. ".lora_"
    kinds: KindSet  # the lorakit layer kinds PEFT implements this method for
    shared_keys: ClassVar[tuple[str, ...]] = ()  # keys outside every layer, read and written whole

    @property
    def variants(self) -> tuple[str, ...]:
        """The registered variants written as this method (from each variant's ``peft`` spec)."""
        specs = {name: cls.peft for name, cls in VARIANTS.items()}
        return tuple(n for n, spec in specs.items() if spec is not None and spec.peft_type == self.peft_type)

    def variant_fields(self, state: AdapterInfo) -> dict[str, Any]:
        """The variant's own PEFT config fields: its flags and its mapped config fields."""
        spec = VARIANTS[state.variant].peft
        values = state.config.to_dict()
        return {**spec.flags, **{peft: values[ours] for ours, peft in spec.config_fields.items()}}

    def variant_for(self, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The first registered variant of this method whose flags ``config`` matches, and the variant's
        own config fields read from ``config``."""
        for name in self.variants:
            spec = VARIANTS[name].peft
            if all(bool(config.get(k)) == bool(v) for k, v in spec.flags.items()):
                fields = spec.config_fields.items()
                return name, {ours: config[peft] for ours, peft in fields if config.get(peft) is not None}
        raise AdapterFileError(f"no lorakit variant reads this {self.peft_type} adapter's settings")

    def config(self, state: AdapterInfo, layers: list[AdaptedLayer], rank: int) -> dict[str, Any]:
        """The method's own fields of ``adapter_config.json``."""
        fields = {"r": rank, "alpha": state.config.alpha, "rank_dropout": 0.0, "module_dropout": 0.0}
        fields |= {"use_effective_conv2d": False, "init_weights": True}
        return fields | self.variant_fields(state)

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
        name, fields = self.variant_for(config)
        return name, options | fields

    def check_export(self, name: str, layer: AdaptedLayer) -> None:
        """Refuse a layer PEFT cannot load as this method, or would load and compute differently."""
        if layer.kind not in self.kinds:
            raise LorakitError(
                f"{name}: PEFT's {self.peft_type} has no {layer.kind.name} layers (only {self.kinds.names()})"
            )
        problem = self.layer_problem(layer)
        if problem is not None:
            raise LorakitError(
                f"{name}: {problem}; PEFT would not compute what this adapter does. Use lorakit.save, or "
                "lorakit.merge and save the merged model, or leave the layer out of targets"
            )

    def layer_problem(self, layer: AdaptedLayer) -> str | None:
        """Why PEFT computes this method on this layer differently from lorakit, whichever library wrote the
        tensors (None: both compute the same): the variant's own reason (:meth:`Variant.peft_problem`), else
        the method's. The base class's: a convolution's padding mode."""
        return layer.variant.peft_problem(layer) or _padding_problem(layer, self.peft_type)

    def params(self, layer: AdaptedLayer) -> dict[str, nn.Parameter]:
        """PEFT key suffix -> the lorakit parameter it holds, for one layer."""
        names = _spec(layer).names
        return {names[n]: p for n, p in layer.variant.named_parameters(recurse=False)}

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
            # exactly the shape PEFT gives the tensor: a transposed factor has as many elements but is wrong.
            # lorakit's shape is PEFT's here, as load_peft first refuses the layers whose factors PEFT shapes
            # otherwise (a LoKr factor split the other way: LoKr.peft_problem).
            expected = self.to_peft(layer, suffix, param.detach(), layer.variant.config.rank).shape
            if value.shape != expected:
                shapes = f"{tuple(value.shape)} is not PEFT's {tuple(expected)} for this layer"
                raise AdapterFileError(f"{key}.{suffix}: the saved tensor's shape {shapes}")
            param.copy_(value.reshape(param.shape))


def _padding_problem(layer: AdaptedLayer, peft_type: str) -> str | None:
    """A convolution that pads other than with zeros: PEFT pads the adapter's input with zeros in every
    method, lorakit as the base does (:func:`lorakit.core.kinds._conv`). Without padding the mode is never
    used."""
    base = layer.base_layer
    mode = getattr(base, "padding_mode", "zeros")
    if not _kernel(layer) or mode == "zeros" or not any(base._reversed_padding_repeated_twice):
        return None
    return (
        f"the convolution pads with padding_mode='{mode}', but PEFT's {peft_type} pads the adapter's input "
        "with zeros, so the two libraries compute different outputs near the borders"
    )


class LoRAMethod(PeftMethod):
    """LoRA's layout: embeddings use ``lora_embedding_A/B``, convolutions a kernel and a 1x1 convolution."""

    def layer_problem(self, layer: AdaptedLayer) -> str | None:
        """Also a dilated convolution: PEFT builds ``lora_A`` from the base's kernel size, stride and padding
        but not its dilation, so (for DoRA as well) the adapter's output has another size than the base's
        (PEFT fails in its forward) or, where broadcasting hides that, other values. A dilation along a kernel
        dimension of size 1 changes nothing."""
        problem = super().layer_problem(layer)
        kernel = _kernel(layer)
        if problem is None and kernel:
            dilation = tuple(layer.base_layer.dilation)
            if any(d > 1 and k > 1 for d, k in zip(dilation, kernel, strict=True)):
                problem = (
                    f"the convolution has dilation={dilation}, but PEFT's LORA builds its lora_A convolution "
                    "without dilation, so its adapter output does not line up with the layer's (PEFT fails "
                    "with a size mismatch)"
                )
        return problem

    def config(self, state: AdapterInfo, layers: list[AdaptedLayer], rank: int) -> dict[str, Any]:
        cfg = state.config
        fields = {
            "r": rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": all(layer.kind.fan_in_fan_out for layer in layers),
            "bias": "none",
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        return fields | self.variant_fields(state)

    def variant_options(
        self, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[str, dict[str, Any]]:
        options = {
            "rank": int(config["r"]),
            "alpha": float(config["lora_alpha"]),
            "dropout": float(config.get("lora_dropout") or 0.0),
        }
        name, fields = self.variant_for(config)
        return name, options | fields

    def params(self, layer: AdaptedLayer) -> dict[str, nn.Parameter]:
        own = dict(layer.variant.named_parameters(recurse=False))
        ids = "embedding_" if layer.kind.takes_ids else ""
        found = {f"lora_{ids}A" + ("" if ids else ".weight"): own["A"]}
        found[f"lora_{ids}B" + ("" if ids else ".weight")] = own["B"]
        return found | {peft: own[ours] for ours, peft in _spec(layer).names.items()}

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
        fields = {"r": rank, "save_projection": True, "vera_dropout": state.config.dropout, "bias": "none",
                  "fan_in_fan_out": all(layer.kind.fan_in_fan_out for layer in layers)}  # fmt: skip
        return fields | self.variant_fields(state)

    def variant_options(
        self, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[str, dict[str, Any]]:
        options = {"rank": int(config["r"]), "dropout": float(config.get("vera_dropout") or 0.0)}
        name, fields = self.variant_for(config)
        a, b = (tensors.get(k) for k in self.shared_keys)
        if a is not None and b is not None:
            options["projection_shape"] = [int(b.shape[0]), int(a.shape[1])]
        return name, options | fields

    def params(self, layer: AdaptedLayer) -> dict[str, nn.Parameter]:
        own = dict(layer.variant.named_parameters(recurse=False))
        return {peft: own[ours] for ours, peft in _spec(layer).names.items()}

    def shared_tensors(self, layers: list[AdaptedLayer]) -> dict[str, Tensor]:
        # PEFT builds the projections at the largest sizes among its layers and loads the saved ones into
        # them: a larger ``projection_shape`` is cut to those (every layer reads only that corner).
        out_max, in_max = max(lay.out_features for lay in layers), max(lay.in_features for lay in layers)
        a, b = layers[0].variant.A[:, :in_max], layers[0].variant.B[:out_max]
        return {self.shared_keys[0]: a.detach().contiguous(), self.shared_keys[1]: b.detach().contiguous()}

    def fill_shared(self, layers: list[AdaptedLayer], tensors: dict[str, Tensor]) -> None:
        v = layers[0].variant
        for key, param in zip(self.shared_keys, (v.A, v.B), strict=True):
            if key in tensors:  # without save_projection the seed alone rebuilt them
                if tensors[key].shape != param.shape:
                    shape = tuple(tensors[key].shape)
                    raise AdapterFileError(f"{key}: shape {shape} is not {tuple(param.shape)}")
                param.copy_(tensors[key])


# PEFT's LoHa and LoKr read a grouped convolution's weight as (out, in / groups, k...), as lorakit does.
MATRIX_AND_CONV = KindSet(
    [LINEAR, KINDS["conv1d"], KINDS["conv2d"], KINDS["conv1d_grouped"], KINDS["conv2d_grouped"]]
)
# The variants of each method come from their ``peft`` specs (a chosen rank and a 4-bit base are not written).
METHODS = (
    LoRAMethod("LORA", ".lora_", FACTOR_KINDS),
    PeftMethod("LOHA", ".hada_", MATRIX_AND_CONV),
    PeftMethod("LOKR", ".lokr_", MATRIX_AND_CONV),
    VeRAMethod("VERA", ".vera_lambda_", KindSet([LINEAR, CONV1D_GPT2])),
)
