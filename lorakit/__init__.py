"""lorakit: parameter-efficient fine-tuning with the LoRA family.

>>> import lorakit
>>> lorakit.apply(model, "lora", targets=["query", "value"], rank=8)
>>> lorakit.save(model, "adapter/")
"""

from lorakit import kernels  # the fast paths: importing them installs their policy in core's slot
from lorakit.adapters.api import (
    AdapterInfo,
    adapted_layers,
    apply,
    disabled,
    info,
    make_hooks,
    merge,
    param_groups,
    unmerge,
)
from lorakit.adapters.io import AdapterFileError, NonFiniteError, load, lorakit_version, save
from lorakit.adapters.quantize import quantize
from lorakit.adapters.summary import summary
from lorakit.adapters.targets import TargetError
from lorakit.common.dirlock import DirectoryInUseError
from lorakit.common.errors import (
    AdapterStateError,
    DiskFullError,
    LorakitError,
    OutputExistsError,
    SettingError,
)
from lorakit.core.config import ConfigError, VariantConfig
from lorakit.core.contract import CapabilityError, Driver
from lorakit.core.layer import AdaptedLayer
from lorakit.core.ranks import evaluate_all_ranks, set_rank
from lorakit.core.variant import Hook, Variant
from lorakit.engine.gradients import BatchError
from lorakit.interop import load_peft, save_peft
from lorakit.variants import VARIANTS, get_variant

__version__ = lorakit_version()

__all__ = [
    "VARIANTS",
    "AdaptedLayer",
    "AdapterFileError",
    "AdapterInfo",
    "AdapterStateError",
    "BatchError",
    "CapabilityError",
    "ConfigError",
    "DirectoryInUseError",
    "DiskFullError",
    "Driver",
    "Hook",
    "LorakitError",
    "NonFiniteError",
    "OutputExistsError",
    "SettingError",
    "TargetError",
    "Variant",
    "VariantConfig",
    "adapted_layers",
    "apply",
    "disabled",
    "evaluate_all_ranks",
    "get_variant",
    "info",
    "kernels",
    "load",
    "load_peft",
    "make_hooks",
    "merge",
    "param_groups",
    "quantize",
    "save",
    "save_peft",
    "set_rank",
    "summary",
    "unmerge",
]
