"""The variant interface: one layer's adapter parameters, its config, and its training-time rules.

A variant only has to say what change it makes to a layer's ``(out, in)`` weight
(:meth:`Variant.delta_weight`).
Everything else has a correct default built on that: the forward pass, merging, unmerging, parameter groups,
saving. Variants override a default where their paper says so (a forward that never forms the delta, DoRA's
merged weight, LoRA+'s learning rates), always in plain PyTorch. Speed lives elsewhere: a variant whose
forward is one of the computation forms of :mod:`lorakit.core.forms` declares it (:meth:`Variant.form`), and
a kernel registered for that form may compute it (``lorakit.kernels``); the variant never names a kernel.
Rules that act during training (AdaLoRA's budget, Delta-LoRA's weight update, DyLoRA's rank sampling) live in
a :class:`Hook` that the variant declares.

This file, :mod:`lorakit.core.contract` and :mod:`lorakit.core.config` (a variant's settings) are the whole
contract between a variant and the code that drives it: every capability a driver may use is a typed member
here with a default (stages before the main run, the drivers a variant refuses, a rank view, PEFT names,
typed shared state, how the base is stored). A driver never probes a variant with ``getattr``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from lorakit.core.config import ConfigError, VariantConfig
from lorakit.core.contract import Driver, PeftSpec, Shared, Stages
from lorakit.core.dropout import dropout
from lorakit.core.forms import Form
from lorakit.core.kinds import FACTOR_KINDS, KindSet, LayerKind


def precise(t: Tensor) -> Tensor:
    """``t`` in fp32, or as it is in fp64: the precision an adapter forms its change in from its own tensors,
    in the forward and in a merge alike. A bf16-stored adapter (``adapter_dtype="bfloat16"``) whose ``B A``
    were rounded to bf16 in the merge but not in the forward would merge into another model, off by up to
    ``2**-8`` of the change."""
    return t.to(precise_dtype(t.dtype))


def precise_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64: the dtype :func:`precise` gives and merges compute in."""
    return torch.promote_types(dtype, torch.float32)


class LayerView(Protocol):
    """What a variant and its hook see of an adapted layer, read-only: its name, kind, shapes, base layer and
    weight, and its adapter. :class:`lorakit.core.layer.AdaptedLayer` is the one implementation; the contract
    names this view instead, so the layer can build on the contract without a circle."""

    name: str  # the module name in the model
    kind: LayerKind
    in_features: int
    out_features: int
    base_layer: nn.Module  # the frozen base layer
    variant: Variant  # the layer's adapter

    @property
    def device(self) -> torch.device:
        """Where the base weight lives."""
        ...

    @property
    def bias(self) -> Tensor | None: ...

    def weight_2d(self) -> Tensor:
        """The base weight as ``(out, in)`` (dequantised if stored quantised)."""
        ...

    def stored_weight(self) -> Tensor:
        """The tensor the base weight is stored in (a quantised layer's codes)."""
        ...

    def weight_is_dequantised(self) -> bool:
        """Whether :meth:`weight_2d` dequantises stored codes into a new tensor."""
        ...

    def weight_folds_exactly(self, x: Tensor) -> bool:
        """Whether ``op(x, W0 + dW)`` may stand in for ``op(x, W0) + op(x, dW)`` in this forward."""
        ...

    def factored(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``B A`` applied to ``x`` as this layer applies its weight, without forming ``B A``."""
        ...


class Hook:
    """Training-time rules of a variant, run at fixed call points by the engine (:mod:`lorakit.engine`) in
    every driver: lorakit's loop, DP-SGD, a ``transformers.Trainer`` and a federated client.

    The order within one optimizer step is: ``on_step_start`` -> forward -> loss + ``extra_loss`` ->
    backward (per micro-batch) -> ``on_after_backward`` -> clip -> ``on_before_optimizer_step`` ->
    ``optimizer.step`` -> ``on_after_step`` -> ``zero_grad``. ``step`` counts optimizer steps from 0. A hook
    is built once per training run from the adapted model and the run's total number of optimizer steps.
    """

    def __init__(self, model: nn.Module, layers: list[LayerView], total_steps: int) -> None:
        self.model = model
        self.layers = layers
        self.total_steps = total_steps

    def on_step_start(self, step: int) -> None:
        """Before the first micro-batch of optimizer step ``step``."""

    def extra_loss(self, step: int) -> Tensor | None:
        """A term added to the task loss of every micro-batch (e.g. AdaLoRA's orthogonality penalty)."""
        return None

    def on_after_backward(self, step: int) -> None:
        """After all micro-batches' backward, before gradient clipping and the optimizer step."""

    def on_before_optimizer_step(self, step: int) -> None:
        """After gradient clipping (DP-SGD: after clipping and noise), just before ``optimizer.step()``: the
        place for a rule that is part of the optimizer's update, such as a gradient preconditioner."""

    def on_after_step(self, step: int) -> None:
        """After ``optimizer.step()``, before gradients are zeroed (gradients are still readable)."""

    def state_dict(self) -> dict[str, Any]:
        """Hook state for checkpoints (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when resuming."""


class Variant(nn.Module):
    """One layer's adapter. Subclasses set the class attributes and implement :meth:`delta_weight`."""

    name: ClassVar[str]
    config_class: ClassVar[type[VariantConfig]] = VariantConfig
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    kinds: ClassVar[KindSet] = FACTOR_KINDS  # the layer kinds it adapts (grouped convolutions: say so)
    hook: ClassVar[type[Hook] | None] = None  # training-time rules, run by every driver
    stages: ClassVar[Stages | None] = None  # work on the training data before the main run
    shared_class: ClassVar[type[Shared]] = Shared  # state shared by the layers of one ``apply``
    # Training state a federated update does not carry (it lives outside the trained parameters, or is
    # decided on one run's data), as a phrase after the variant's name; None: there is none. Federated
    # clients refuse such a variant: the server would aggregate without it, and the next client a process
    # plays would start from another's.
    unshared_state: ClassVar[str | None] = None
    # How it reads and writes PEFT's adapter format (None: it doesn't). Declared by each class itself, never
    # inherited (see __init_subclass__).
    peft: ClassVar[PeftSpec | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that changes its parent's math would be written as the parent and read back as it,
        # without a word: a PEFT spec counts only on the class that declares it.
        cls.peft = cls.__dict__.get("peft")
        # Likewise a kernel would compute the parent's form in place of a forward the subclass rewrote.
        if "forward" in cls.__dict__ and "form" not in cls.__dict__:
            cls.form = Variant.form  # type: ignore[method-assign]

    def __init__(self, config: VariantConfig, base: LayerView, shared: Shared) -> None:
        """``base`` is a read-only view of the layer (name, kind, shapes, weight); ``shared`` is one
        :attr:`shared_class` object per ``apply`` call, for state all layers share (VeRA's projections)."""
        super().__init__()
        self.config = config
        # Dropout acts on the adapter's input only, never on the base path; integer inputs never drop.
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 and not base.kind.takes_ids else None

    # --- which drivers can run it ----------------------------------------------------------------------
    @classmethod
    def refusal(cls, driver: Driver, config: VariantConfig) -> str | None:
        """Why this variant with ``config`` cannot run in ``driver`` (None: it can, with all its rules)."""
        if driver is Driver.FEDERATED and cls.unshared_state is not None:
            return (
                f"variant '{cls.name}' {cls.unshared_state}, which federated updates do not carry; use "
                "--variant dp_dylora, dylora or lora"
            )
        stages = cls.stages
        if stages is not None and stages.pending(config) and driver not in stages.drivers:
            return (
                f"variant '{cls.name}' runs stages on the training data before the main run, which "
                f"{driver.value} cannot run with its guarantees; train it with lorakit's loop or choose "
                "another variant"
            )
        return None

    # --- rank view -------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The rank the adapter uses now (outside training): a chosen rank, or the live rank after pruning."""
        return self.config.rank

    def rank_choices(self) -> range | None:
        """The ranks :meth:`choose_rank` accepts after training (None: the rank is fixed)."""
        return None

    def choose_rank(self, b: int | None) -> None:
        """Use rank ``b`` outside training (None: the largest); only where :meth:`rank_choices` is set."""
        raise ConfigError(f"variant '{self.name}' has a fixed rank; only variants with rank choices take one")

    def round_ranks(self) -> tuple[int, int] | None:
        """``(low, high)`` when a federated server draws one rank per round for this variant, else None."""
        return None

    def rank_slices(self, b: int) -> dict[str, tuple[slice, ...]]:
        """Where the rank-``b`` adapter lives in each parameter (a round's update space when
        :meth:`round_ranks` is set); default: every parameter whole."""
        return {}

    @classmethod
    def saved_rank(cls, config: VariantConfig, shapes: dict[str, tuple[int, ...]]) -> int:
        """The rank of one saved layer from the config and its saved tensors' shapes (local key -> shape)."""
        return config.rank

    # --- PEFT interop ----------------------------------------------------------------------------------
    def peft_problem(self, base: LayerView) -> str | None:
        """Why PEFT would read this layer differently (None: it reads it exactly)."""
        return None

    def delta_weight(self) -> Tensor:
        """The change this adapter makes to the base weight, as ``(out, in)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight()")  # abstract

    def needs_base_output(self, x: Tensor, base: LayerView) -> bool:
        """Whether :meth:`forward` needs the base layer's output for the input ``x``. When False the layer
        skips the base op and :meth:`forward` gets ``y=None`` and computes the whole output (see
        :meth:`LayerView.weight_folds_exactly`). Default: True."""
        return True

    def form(self, base: LayerView) -> Form | None:
        """The computation form of :meth:`forward` in this call (:mod:`lorakit.core.forms`), built from the
        parameters as they are now, through which a registered kernel may compute it instead; None: only
        :meth:`forward` computes it. A class that writes its own :meth:`forward` declares its own form (or
        none): it never inherits its parent's."""
        return None

    def dropout_rate(self) -> float:
        """The rate of the adapter's input dropout in this call (0 without dropout or outside training)."""
        return self.dropout.p if self.dropout is not None and self.training else 0.0

    def forward(self, x: Tensor, y: Tensor, base: LayerView) -> Tensor:
        """Adapted output from the input ``x`` and the base output ``y`` (None only where
        :meth:`needs_base_output` said so). Default: ``y + op(x~, dW)``."""
        delta = self.delta_weight().to(y.dtype)
        x = self.drop(x).to(y.dtype) if x.is_floating_point() else x  # embedding inputs stay integer ids
        return y + base.kind.op(base.base_layer, x, delta)

    def drop(self, x: Tensor) -> Tensor:
        """The adapter's input dropout (identity in eval mode or without dropout)."""
        return dropout(x, self.dropout.p, self.training) if self.dropout is not None else x

    def merged_weight(self, w0: Tensor, base: LayerView) -> Tensor:
        """The ``(out, in)`` weight that reproduces the adapted layer. Default ``W0 + dW``."""
        return w0 + self.delta_weight().to(w0.dtype)

    def unmerged_weight(self, w: Tensor, base: LayerView) -> Tensor:
        """Inverse of :meth:`merged_weight`."""
        return w - self.delta_weight().to(w.dtype)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups for this adapter's trainable parameters. Default: one group at ``lr``."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    @classmethod
    def trained_module_groups(
        cls, config: VariantConfig, params: list[nn.Parameter], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """Optimizer groups for the parameters of the fully trained modules (``config.train_modules``).

        Asked once per model by the optimizer-group builder. Default: one group at ``lr``.
        """
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    def adapter_state(self) -> dict[str, Tensor]:
        """Tensors saved with the adapter. Default: the state dict (parameters and persistent buffers)."""
        return dict(self.state_dict())

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`adapter_state` output (shapes must match unless a variant resizes itself)."""
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(f"adapter file lacks tensors {sorted(missing)}; it was saved by another variant")
        with torch.no_grad():
            for key, value in self.state_dict(keep_vars=True).items():
                value.copy_(state[key])
