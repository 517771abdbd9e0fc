"""Runs a variant's stages before the main run (``Variant.stages``) on lorakit's tokenised training data.

:class:`DataStages` is the driver's side of :class:`lorakit.core.contract.StageContext`: it trains with
lorakit's loop on a subset of the data, batches it for scoring (with a progress bar: scoring a sample of
an LLM's data takes minutes), and rebuilds the adapters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from torch import Tensor, nn

import lorakit
from lorakit.adapters.io import undo_apply
from lorakit.core.config import VariantConfig
from lorakit.core.contract import CapabilityError, Driver
from lorakit.data.datasets import BatchSampler, TokenizedData, eval_batches
from lorakit.engine.config import TrainConfig
from lorakit.engine.run import progress_bar

# A short training run for the stages (lorakit.train.loop.stage_run): model, batches, settings.
StageTraining = Callable[[nn.Module, BatchSampler, TrainConfig], Any]


class DataStages:
    """A :class:`lorakit.core.contract.StageContext` over ``data``, training with ``train``."""

    def __init__(
        self, model: nn.Module, data: TokenizedData, cfg: TrainConfig, train: StageTraining, progress: bool
    ) -> None:
        self.model, self.data, self.cfg, self.trainer = model, data, cfg, train
        self.progress = progress and cfg.progress
        self.seed, self.steps, self.batch_size = cfg.seed, cfg.steps, cfg.batch_size
        modules = dict(model.named_modules())
        # Fully trained modules (a new head) as they were before the stages, to restore in ``reapply``.
        self.heads = {
            n: {k: v.clone() for k, v in modules[n].state_dict().items()}
            for n in lorakit.info(model).train_modules
        }

    def strata(self) -> list[Hashable]:
        return [label if isinstance(label, int) else None for label in self.data.labels]

    def subset(self, indices: list[int]) -> TokenizedData:
        d = self.data
        return TokenizedData([d.input_ids[i] for i in indices], [d.labels[i] for i in indices], d.pad_id)

    def train(self, indices: list[int], steps: int) -> None:
        stage = dataclasses.replace(self.cfg, steps=steps, eval_every=0, checkpoint_every=0)
        self.trainer(self.model, BatchSampler(self.subset(indices), self.batch_size, self.seed), stage)

    def batches(self, indices: list[int]) -> Iterator[dict[str, Tensor]]:
        with progress_bar(-(-len(indices) // self.batch_size), 0, self.progress, "stage scoring") as bar:
            for batch in eval_batches(self.subset(indices), self.batch_size):
                yield batch
                bar.update()

    def config(self) -> VariantConfig:
        return lorakit.info(self.model).config

    def reapply(self, config: VariantConfig) -> None:
        undo_apply(self.model)
        modules = dict(self.model.named_modules())
        for name, state in self.heads.items():
            modules[name].load_state_dict(state)
        lorakit.apply(self.model, config)


def run_stages(
    model: nn.Module,
    data: TokenizedData,
    cfg: TrainConfig,
    driver: Driver,
    train: StageTraining,
    progress: bool = False,
) -> dict[str, Any]:
    """Refuse a variant ``driver`` cannot run, then run its pending stages (if any) on ``data``, training
    with ``train``; returns what they decided. ``progress``: this process may show a bar while they score
    the data (where ``cfg.progress``)."""
    lorakit.adapters.api.check_driver(model, driver)
    stages = lorakit.get_variant(lorakit.info(model).variant).stages
    if stages is None or not stages.pending(lorakit.info(model).config):
        return {}
    return stages.run(DataStages(model, data, cfg, train, progress))


def run_pending_stages(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    cfg: TrainConfig,
    driver: Driver,
    train: StageTraining,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`run_stages` on the data behind ``batches``; refuses batches that hide their data when stages
    are pending (training without them would silently be another method)."""
    stages = lorakit.get_variant(lorakit.info(model).variant).stages
    if stages is None or not stages.pending(lorakit.info(model).config):
        return {}
    if not isinstance(batches, BatchSampler):
        raise CapabilityError(
            f"variant '{lorakit.info(model).variant}' runs stages on the training data before the main run; "
            "pass a lorakit.data.datasets.BatchSampler so they can read it"
        )
    return run_stages(model, batches.data, cfg, driver, train, progress)
