"""LoRA-drop: own LoRA on important modules, a shared LoRA for the rest. Zhou et al., 2024, arXiv:2402.07721.

Importance of module ``i`` from a short LoRA run on a stratified sample of the data::

    g_i = sum over samples and tokens ||dW_i x_i||^2,   I_i = g_i / sum_j g_j

Modules sorted by ``I_i`` are kept until their cumulative importance reaches ``threshold``; each kept module
gets its own LoRA ``dW_i = s B_i A_i`` and every other module uses the one pair of its weight shape,
``dW = s B_shape A_shape`` (the same Parameter objects in every sharing layer: the optimizer and the saved
file hold them once). The stages (:mod:`lorakit.variants.lora_drop_stages`) run before the main run, in
every driver that can run them; the selection is stored in the config field ``kept``, so
:func:`lorakit.load` rebuilds the sharing.
The paper publishes no code: the sample size, stage-1 length and sharing key (shape and layer kind) are ours.

Before selection (``kept=None``) every module is kept, i.e. the variant is plain LoRA. ``B = 0`` at init
(``A = 0`` for embeddings) in own and shared pairs alike, so the model is the base at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.core.config import ConfigError, require
from lorakit.core.contract import Shared
from lorakit.core.kinds import LayerKind
from lorakit.core.layer import AdaptedLayer
from lorakit.variants.lora import LoRA, LoRAConfig
from lorakit.variants.lora_drop_stages import LoRADropStages


@dataclass
class LoRADropConfig(LoRAConfig):
    """LoRA-drop. ``sample_ratio``: fraction of the training data in the stratified stage-1 sample.
    ``sample_steps``: stage-1 optimizer steps (0: ``sample_ratio`` times the run's steps, at least 1).
    ``threshold``: cumulative importance T the kept modules reach. ``kept``: names of the modules with their
    own LoRA, filled by the selection (None: not selected yet, every module has its own LoRA)."""

    sample_ratio: float = 0.1
    sample_steps: int = 0
    threshold: float = 0.9
    kept: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        require(0 < self.sample_ratio <= 1, "sample_ratio", self.sample_ratio, "in (0, 1]")
        ok = isinstance(self.sample_steps, int) and self.sample_steps >= 0
        require(ok, "sample_steps", self.sample_steps, "an integer >= 0 (0: sample_ratio * steps)")
        require(0 < self.threshold <= 1, "threshold", self.threshold, "in (0, 1]")
        if self.kept is not None:
            ok = isinstance(self.kept, (list, tuple)) and all(isinstance(n, str) for n in self.kept)
            require(ok, "kept", self.kept, "a list of module names, or None before selection")
            self.kept = list(self.kept)


@dataclass
class LoRADropShared(Shared):
    """The one ``(A, B)`` pair per ``(kind, out, in)`` that every unselected layer of an ``apply`` uses."""

    pairs: dict[tuple[LayerKind, int, int], tuple[nn.Parameter, nn.Parameter]] = field(default_factory=dict)


class LoRADrop(LoRA):
    """LoRA whose unselected modules share one ``(A, B)`` pair per weight shape."""

    name = "lora_drop"
    config_class = LoRADropConfig
    summary = "LoRA on the modules whose output matters most; the others share one LoRA per shape"
    paper = "arXiv:2402.07721"
    stages = LoRADropStages()
    shared_class = LoRADropShared
    peft = None  # PEFT would untie the shared pairs (said here for the reader: no class inherits a spec)

    def __init__(self, config: LoRADropConfig, base: AdaptedLayer, shared: LoRADropShared) -> None:
        super().__init__(config, base, shared)
        self.module_name = base.name
        if config.kept is not None and set(config.kept) - set(shared.targets):
            unknown = sorted(set(config.kept) - set(shared.targets))
            raise ConfigError(f"config field 'kept' names modules that are not targets: {unknown[:5]}")
        self.is_shared = config.kept is not None and self.module_name not in config.kept
        if self.is_shared:
            # One pair per (kind, out, in): embeddings start with the other factor at zero.
            key = (base.kind, base.out_features, base.in_features)
            self.A, self.B = shared.pairs.setdefault(key, (self.A, self.B))  # the first sharing layer's pair
