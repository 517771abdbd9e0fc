"""Run lorakit's training rules inside a ``transformers.Trainer``.

``LorakitTrainer`` is a drop-in ``Trainer`` for an adapted model: it builds the optimizer that
``TrainingArguments.optim`` names over the variants' parameter groups (LoRA+ rates), adds the hooks' extra
losses (AdaLoRA's orthogonality penalty) and runs every hook at the same call points as lorakit's own loop,
through :class:`LorakitCallback`::

    trainer = LorakitTrainer(model=lorakit.apply(model, "adalora"), args=args, train_dataset=ds)
    trainer.train()

The callback maps Trainer events to hook call points: ``on_step_begin`` -> ``on_step_start``,
``on_pre_optimizer_step`` (after the Trainer's clipping, just before ``optimizer.step``) ->
``on_before_optimizer_step``, ``on_optimizer_step`` (after ``optimizer.step``, before gradients are zeroed) ->
``on_after_step``. ``state.global_step`` is the optimizer-step index in all of them.

Two Trainer details differ from lorakit's loop and are corrected by :class:`LorakitTrainer`: the Trainer clips
gradients *before* ``on_pre_optimizer_step``, so the trainer runs ``on_after_backward`` from its clipping
step, before the clip (without clipping, ``on_pre_optimizer_step`` runs it first); and a task loss the model
already normalised over all micro-batches of a step (``num_items_in_batch``) is not divided by the
accumulation steps, so the extra loss is divided here and counts once per optimizer step.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.training_args import OptimizerNames

import lorakit
from lorakit.adapters.io import atomic_write, tensor_identity
from lorakit.common.errors import SettingError
from lorakit.core.contract import Driver
from lorakit.engine.checkpoint import ResumeError, check_step, grad_norm
from lorakit.engine.hooks import HookRunner

HOOKS_FILE = "lorakit_hooks.pt"  # the training rules' state, beside each Trainer checkpoint's own files
RULES, MAX_STEPS = "rules", "max_steps"  # its fields: the state, and the run length its schedules assume


def shared_tensors(model: nn.Module) -> bool:
    """Whether adapted layers share a tensor (VeRA's projections, LoRA-drop's shared pairs)."""
    owners: dict[tuple[Any, ...], set[str]] = {}
    for name, layer in lorakit.adapters.api.adapted_layers(model):
        for tensor in layer.variant.state_dict().values():
            owners.setdefault(tensor_identity(tensor), set()).add(name)
    return any(len(names) > 1 for names in owners.values())


def one_copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each tensor under its first name only: safetensors holds no aliases, and loading
    the first name fills the others, which are the same tensor (empty and meta tensors are kept)."""
    seen: set[tuple[Any, ...]] = set()
    kept = {}
    for key, value in state_dict.items():
        if isinstance(value, Tensor) and value.device.type != "meta" and value.numel():
            if tensor_identity(value) in seen:
                continue
            seen.add(tensor_identity(value))
        kept[key] = value
    return kept


class LorakitCallback(TrainerCallback):
    """Maps Trainer events onto the engine's hook calls (:class:`lorakit.engine.HookRunner`), the same calls
    in the same order as every other driver (use :class:`LorakitTrainer` for extra losses and clip order).

    The rules' state (AdaLoRA's importance averages and masks, say) is written into every checkpoint the
    Trainer saves (:data:`HOOKS_FILE`) and read back when training resumes from one, as lorakit's own
    checkpoints do, so a resumed run decides as the uninterrupted one."""

    def __init__(self, model: nn.Module, *, adds_loss: bool = False) -> None:
        """``adds_loss``: whether the Trainer adds the rules' extra loss to its own (:class:`LorakitTrainer`
        does; a plain ``Trainer`` cannot, so a variant with one is refused there)."""
        self.model = model
        self.adds_loss = adds_loss
        self.hooks = HookRunner([])
        self.backward_done = -1  # the last step whose on_after_backward ran
        self.resume_dir: str | None = None  # the checkpoint a resumed run starts from, where known
        self.loss_scaled: bool | None = None  # whether a loss scaler skips non-finite steps, where known
        self.max_steps = 0  # the run's, which the rules' schedules assume

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        lorakit.adapters.api.check_driver(
            self.model, Driver.TRAINER
        )  # before any step: refuse what can't run here
        self.hooks = HookRunner(lorakit.make_hooks(self.model, state.max_steps))
        self.backward_done = -1
        if kwargs.get("optimizer") is not None:
            check_rates(self.model, kwargs["optimizer"])
        if args.load_best_model_at_end and any(self.hooks.state_dict()):
            variant = lorakit.info(self.model).variant
            raise SettingError(
                f"variant '{variant}' keeps its training rules' state (rank masks, say) beside the "
                "weights, and load_best_model_at_end reloads only the best checkpoint's weights, which would "
                "run with the last step's state; set load_best_model_at_end=False and resume from, or "
                "evaluate, the best checkpoint instead"
            )
        if not self.adds_loss:
            with torch.no_grad():
                extra = self.hooks.extra_loss(state.global_step)
            if extra is not None:
                variant = lorakit.info(self.model).variant
                raise SettingError(
                    f"variant '{variant}' adds a term of its own to the loss (a regulariser), which a plain "
                    "Trainer with LorakitCallback cannot add, so it would train without it; use "
                    "LorakitTrainer (or set the term's weight in the variant's config to 0)"
                )
        lorakit.adapters.api.check_trains(self.model)
        if not self.adds_loss and shared_tensors(self.model):
            raise SettingError(
                f"the '{lorakit.info(self.model).variant}' adapter shares tensors between layers, which a "
                "plain Trainer's checkpoints and save_model (safetensors) cannot hold; use LorakitTrainer"
            )
        self.max_steps = state.max_steps
        if state.global_step > 0:  # resumed: the Trainer loaded the checkpoint's state before this event
            default = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.restore(Path(self.resume_dir) if self.resume_dir else default)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            buffer = io.BytesIO()
            torch.save({RULES: self.hooks.state_dict(), MAX_STEPS: state.max_steps}, buffer)
            atomic_write(folder / HOOKS_FILE, lambda path: Path(path).write_bytes(buffer.getvalue()))

    def restore(self, folder: Path) -> None:
        """The rules' state from the checkpoint ``folder`` (tensors, numbers and lists only)."""
        path = folder / HOOKS_FILE
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if isinstance(saved, dict) and set(saved) == {RULES, MAX_STEPS}:
                if saved[MAX_STEPS] != self.max_steps and any(self.hooks.state_dict()):
                    raise ResumeError(
                        f"{folder} was trained for max_steps={saved[MAX_STEPS]} and this run has "
                        f"{self.max_steps}; the training rules' schedules depend on it, so resume with "
                        f"max_steps={saved[MAX_STEPS]}"
                    )
                saved = saved[RULES]
            self.hooks.load_state_dict(saved)
        elif not folder.is_dir() and any(self.hooks.state_dict()):
            raise ResumeError(
                f"the run resumed at a step whose checkpoint folder {folder} does not exist, so the training "
                "rules' state cannot be read: a plain Trainer does not tell LorakitCallback where it resumed "
                "from; resume from a checkpoint in output_dir, or use LorakitTrainer"
            )
        elif any(self.hooks.state_dict()):
            variant = lorakit.info(self.model).variant
            raise ResumeError(
                f"{folder} holds no {HOOKS_FILE}: the state of variant '{variant}''s training rules was not "
                "saved with this checkpoint, so the resumed run would decide "
                "differently; resume from a checkpoint saved with LorakitTrainer (or LorakitCallback), or "
                "train from the start"
            )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.hooks.step_start(state.global_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.after_backward(state.global_step)  # a no-op when the clipping step already ran it
        # accelerate scales fp16 losses off the CPU only; a scaler skips non-finite steps itself
        scaled = self.loss_scaled if self.loss_scaled is not None else args.fp16 and args.device.type != "cpu"
        if not scaled:
            # As every lorakit driver: a NaN or infinite gradient stops the run before it reaches the weights.
            norm = grad_norm(p for p in self.model.parameters() if p.requires_grad)
            kept = f"the Trainer's checkpoints in {args.output_dir} are as they were"
            check_step(state.global_step, None, norm, None, None, kept=kept)
        self.hooks.before_optimizer(state.global_step)

    def after_backward(self, step: int) -> None:
        """``on_after_backward`` once per optimizer step (before clipping when run by LorakitTrainer)."""
        if self.backward_done == step:
            return
        self.backward_done = step
        self.hooks.after_backward(step)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        if isinstance(optimizer, AcceleratedOptimizer) and optimizer.step_was_skipped:
            return  # fp16's loss scaler found non-finite gradients: nothing moved, and they are no signal
        self.hooks.after_step(state.global_step)

    def extra_loss(self, step: int) -> Tensor | None:
        return self.hooks.extra_loss(step)


class OptimizerError(SettingError):
    """The Trainer's optimizer setting cannot be honoured with lorakit's parameter groups."""


def check_rates(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer (the user's own, or a plain Trainer's) that leaves out a trainable tensor, or whose
    learning rates do not follow the variant's own where it sets several (LoRA+'s ``lr_B = ratio * lr_A``):
    the Trainer would train at one rate what the paper trains at two, silently. Rates proportional to the
    base rate are compared in proportion (the optimizer's base rate may be any); a rate the variant fixes
    (LoRA+'s rate for an embedding's adapter) as it is. A scheduler's starting rate is what is compared."""
    one, two = (_rates(lorakit.param_groups(model, base)) for base in (1.0, 2.0))
    actual = _rates(optimizer.param_groups)
    variant = lorakit.info(model).variant
    fix = "build it over lorakit.param_groups(model, lr), or let LorakitTrainer build it (no optimizers=)"
    # a tensor made trainable by hand outside the adapter: the optimizer's to train, if it takes it
    stray = (
        n for n, p in model.named_parameters() if p.requires_grad and id(p) not in actual and id(p) not in one
    )
    left_out = next(stray, None)
    if left_out is not None:
        raise OptimizerError(f"the optimizer leaves out {left_out}, which is trainable and would not train")
    missing = [k for k in one if k not in actual]
    if missing:
        raise OptimizerError(
            f"the optimizer leaves out {len(missing)} of the {len(one)} trainable tensors of the '{variant}' "
            f"adapter, which would not train; {fix}"
        )
    if len(set(one.values())) == 1:  # one rate for every tensor: any base rate follows it
        return
    implied = [actual[k] / one[k] for k in one if two[k] == 2 * one[k]]  # the base rate each group implies
    fixed = all(math.isclose(actual[k], one[k], rel_tol=1e-6) for k in one if two[k] != 2 * one[k])
    if not fixed or (implied and max(implied) > min(implied) * (1 + 1e-6)):
        raise OptimizerError(
            f"the optimizer's learning rates do not follow the ones variant '{variant}' sets for its tensors "
            f"(some train at a multiple of the others' rate); {fix}"
        )


def _rates(groups: list[dict[str, Any]]) -> dict[int, float]:
    """Each tensor's learning rate in ``groups`` (a scheduler's starting rate where it set one)."""
    return {id(p): g.get("initial_lr", g["lr"]) for g in groups for p in g["params"]}


def optimizer_for(args: TrainingArguments, model: nn.Module) -> tuple[Any, dict[str, Any]]:
    """The optimizer class and arguments the Trainer's own rule gives for ``args.optim``."""
    try:
        return Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError) as err:
        name, detail = OptimizerNames(args.optim).value, " ".join(str(err).split())
        raise OptimizerError(f"TrainingArguments.optim={name!r}: {detail}") from None


def refuse_unsupported(optim: str, optimizer_cls: Any, kwargs: dict[str, Any]) -> None:
    """Refuse an optimizer that builds its own parameter groups or takes the model (GaLore, LOMO, layer-wise
    and factory optimizers): lorakit's groups would be replaced, or could not be passed at all."""
    own = sorted({"params", "model", "optimizer_dict"} & set(kwargs))
    takes_groups = isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
    if own or not takes_groups:
        how = f"builds its own {own[0]}" if own else "is not a torch optimizer over parameter groups"
        raise OptimizerError(
            f"TrainingArguments.optim={optim!r} {how}, so lorakit's parameter groups cannot be used; choose "
            "an optimizer over parameter groups, e.g. adamw_torch, adamw_bnb_8bit or paged_adamw_8bit"
        )


class LorakitTrainer(Trainer):
    """A ``Trainer`` that runs lorakit's hooks, adds their losses and uses the variants' parameter groups.

    ``save_model`` writes the adapter in lorakit's format (:func:`lorakit.save`: ``adapter.json`` +
    ``adapter.safetensors``, which :func:`lorakit.load` and ``lorakit eval`` read), not the wrapped model
    (under FSDP or DeepSpeed, whose state is gathered by the Trainer, it keeps the Trainer's own save); the
    Trainer's checkpoints keep the whole state for resuming, each shared tensor once."""

    lorakit_callback: LorakitCallback | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lorakit_callback = LorakitCallback(self.model, adds_loss=True)
        self.add_callback(self.lorakit_callback)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        model = super().call_model_init(trial)
        if self.lorakit_callback is not None:  # model_init builds a new model for each train()
            self.lorakit_callback.model = model
        return model

    def train(
        self, resume_from_checkpoint: str | os.PathLike[str] | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; the checkpoint it resumes from also gives back the training rules' state."""
        where = resume_from_checkpoint
        if where is True:  # the Trainer's rule: the newest checkpoint in output_dir
            where = get_last_checkpoint(self.args.output_dir)
        self.lorakit_callback.resume_dir = str(where) if isinstance(where, (str, os.PathLike)) else None
        deepspeed = self.is_deepspeed_enabled and self.args.fp16  # DeepSpeed scales fp16 losses itself
        self.lorakit_callback.loss_scaled = self.accelerator.scaler is not None or deepspeed
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call or self.is_fsdp_enabled or self.is_deepspeed_enabled:  # a checkpoint: whole state
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            out = output_dir if output_dir is not None else self.args.output_dir
            lorakit.save(self.model, out, overwrite=True)  # the Trainer's rule: save_model writes over
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The Trainer's warning on resuming, without the names :func:`one_copy` left out: they are loaded,
        as the same tensor as the name kept."""
        state = self.model.state_dict()
        aliases = set(state) - set(one_copy(state))
        missing = [k for k in load_result.missing_keys if k not in aliases]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        state = state_dict if state_dict is not None else self.model.state_dict()
        return super()._save(output_dir, one_copy(state))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The optimizer ``TrainingArguments.optim`` names (or ``optimizer_cls_and_kwargs``), as the Trainer
        would build it, over the variants' parameter groups (LoRA+'s rates) instead of the Trainer's two
        weight-decay groups; an optimizer that cannot take those groups is refused."""
        groups = lorakit.param_groups(self.model, self.args.learning_rate, self.args.weight_decay)
        # also with an optimizer of one's own: save_model writes the adapter and train_modules alone
        lorakit.adapters.api.check_trained(self.model, groups)
        if self.optimizer is None:
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs or optimizer_for(self.args, self.model)
            refuse_unsupported(OptimizerNames(self.args.optim).value, optimizer_cls, kwargs)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        # lorakit's order: the hooks see the accumulated gradients first, then they are clipped.
        self.lorakit_callback.after_backward(self.state.global_step)
        return super()._clip_grad_norm(model)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        extra = self.lorakit_callback.extra_loss(self.state.global_step) if model.training else None
        if extra is not None:
            if self.loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
                extra = extra / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer leaves this loss undivided by the accumulation steps (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        by_items = getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        return bool(by_items or getattr(self, "compute_loss_func", None) is not None)
