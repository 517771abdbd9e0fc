"""The registry: every variant lorakit ships, by its one name (the table of contents).

Adding a method is one file in this package and one line below; the conformance tests, the CLI, the
benchmarks and the README table pick it up from here.
"""

from __future__ import annotations

from lorakit.core.variant import Variant
from lorakit.variants.lora import LoRA

VARIANTS: dict[str, type[Variant]] = {
    "lora": LoRA,
}


def get_variant(name: str) -> type[Variant]:
    """The variant class registered as ``name``; a clear error listing the choices otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant '{name}'; choose one of: {', '.join(VARIANTS)}") from None
