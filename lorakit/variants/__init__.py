"""The registry: every variant lorakit ships, by its one name (the table of contents).

Adding a method is one file in this package and one line below; the conformance tests, the CLI, the
benchmarks and the README table pick it up from here.
"""

from __future__ import annotations

from lorakit.core.config import ConfigError
from lorakit.core.variant import Variant
from lorakit.variants.adalora import AdaLoRA
from lorakit.variants.delta_lora import DeltaLoRA
from lorakit.variants.dora import DoRA
from lorakit.variants.dp_dylora import DPDyLoRA
from lorakit.variants.dylora import DyLoRA
from lorakit.variants.loha import LoHa
from lorakit.variants.lokr import LoKr
from lorakit.variants.lora import LoRA
from lorakit.variants.lora_drop import LoRADrop
from lorakit.variants.lora_fa import LoRAFA
from lorakit.variants.lora_plus import LoRAPlus
from lorakit.variants.qlora import QLoRA
from lorakit.variants.vera import VeRA

VARIANTS: dict[str, type[Variant]] = {
    "lora": LoRA,
    "lora_fa": LoRAFA,
    "delta_lora": DeltaLoRA,
    "lora_plus": LoRAPlus,
    "loha": LoHa,
    "lokr": LoKr,
    "dora": DoRA,
    "vera": VeRA,
    "adalora": AdaLoRA,
    "qlora": QLoRA,
    "dylora": DyLoRA,
    "dp_dylora": DPDyLoRA,
    "lora_drop": LoRADrop,
}


def get_variant(name: str) -> type[Variant]:
    """The variant class registered as ``name``; a clear error listing the choices otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown variant '{name}'; choose one of: {', '.join(VARIANTS)}") from None
