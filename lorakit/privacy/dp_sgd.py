"""DP-SGD for any variant: Poisson-sampled batches, per-example clipping, Gaussian noise, and an accountant.

Abadi et al. 2016 (arXiv:1607.00133). Each optimizer step samples every training example independently with
probability ``q = batch_size * grad_accum / N``, clips each example's gradient over all trainable tensors
(adapters and trained head) to norm ``C``, sums, adds ``N(0, (sigma C)^2)`` to every coordinate and divides
by the expected batch size ``q N``. Opacus does the mechanics (GradSampleModule hooks with lorakit's adapter
rule, ``DPOptimizer``, ``UniformWithReplacementSampler``, RDP/PRV accountants).

The steps run in the engine (:mod:`lorakit.engine`) with every hook, as in :func:`lorakit.train.loop.train`;
DP-SGD supplies the gradients through the engine's seam, so ``on_after_backward`` and the optimizer see only
the privatised gradient: whatever a hook derives from gradients (AdaLoRA's importance scores) is
post-processing and costs no privacy; a data-independent ``extra_loss`` (AdaLoRA's orthogonality term) is
added after the noise. The global gradient clip of ``TrainConfig.clip`` is replaced by per-example clipping.

The noise and the Poisson sample come from generators seeded from ``os.urandom`` (never stored), not from
``TrainConfig.seed``, which ``job.json`` records (:mod:`lorakit.privacy.randomness`); the noise uses Opacus'
``secure_mode``. The training loss, the batch sizes and how max length cut the training data are statistics of
the private data that the accountant does not cover, so they are not reported; evaluation on held-out data
is. Settings that cannot be honoured on the data's size (public in DP-SGD's model) are refused before
training (:func:`plan`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core.contract import Driver, GradientSource
from lorakit.core.variant import Hook
from lorakit.data.datasets import TokenizedData, check_one_step
from lorakit.engine import Engine, TrainConfig, TrainResult
from lorakit.privacy import require
from lorakit.privacy.accountant import Accountant, run_noise
from lorakit.privacy.config import DPConfig, PrivacyError, check_delta_below
from lorakit.privacy.randomness import NOISE_STREAM, SAMPLING_STREAM, private_generator, warn_insecure
from lorakit.privacy.report import privacy_record

# What a DP-SGD run withholds because the accountant does not cover it (printed and recorded as such): the
# training loss, the Poisson batches' sizes, and how many of the training data's answers max length cut or
# left out (a causal LM's; the evaluation data's are reported).
NOT_RELEASED = "training losses, batch sizes and the training data's truncation counts"


@dataclass
class DPTrainResult(TrainResult):
    """A training result plus the privacy spent: ``epsilon`` at ``delta`` after ``steps`` steps."""

    epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    epsilons: list[float] = field(default_factory=list)  # after each step
    stopped: str | None = None  # why training ended before ``cfg.steps``


def per_example_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``(N,)`` losses: cross-entropy per example (classification) or the mean over an example's target
    tokens (causal LM). DP needs a mean of per-example losses; a model's own token-averaged loss would
    weight each example by the other examples' lengths."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    logits = getattr(model(**inputs), "logits", None)
    if logits is None:
        raise PrivacyError("DP training needs a model whose output has .logits (classification or causal LM)")
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # predict token t+1 from tokens <= t
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (N, T-1)
    mask = labels != -100
    return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)


def plan(cfg: TrainConfig, dp: DPConfig, examples: int) -> tuple[float, float]:
    """The noise multiplier and the sample rate of DP-SGD on ``examples`` training examples, once every
    setting that depends on their number is checked: a :class:`PrivacyError` names what cannot be honoured.
    Nothing here reads the data but its size, which is public in DP-SGD's model (the sample rate ``q``
    released with the run reveals it), so a run can be refused before it trains or writes anything."""
    check_one_step(examples, cfg.batch_size, cfg.grad_accum)  # the expected Poisson batch, as a fixed one
    q = cfg.batch_size * cfg.grad_accum / examples
    if dp.noise_multiplier != 0:  # without noise epsilon is infinite whatever delta is
        check_delta_below(dp.delta, examples, "training examples", "--delta")
    sigma = run_noise(
        dp.noise_multiplier,
        dp.target_epsilon,
        dp.delta,
        q,
        cfg.steps,
        dp.accountant,
        "step",
        "raise --noise-multiplier (or leave it unset: the target then sets it), lower --batch-size, or raise "
        "--target-epsilon",
    )
    return sigma, q


def train_dp(
    model: nn.Module,
    data: TokenizedData,
    cfg: TrainConfig,
    dp: DPConfig,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    hooks: list[Hook] | None = None,
) -> DPTrainResult:
    """Train the adapted ``model`` on ``data`` with DP-SGD for up to ``cfg.steps`` steps.

    The noise multiplier is ``dp.noise_multiplier`` or, if unset, the smallest one that spends
    ``dp.target_epsilon`` in ``cfg.steps`` steps. With a target, training stops (with a warning) before a
    step that would exceed it. Epsilon after every step is in the result and on the progress bar. The steps
    run in the engine (:class:`lorakit.engine.Engine`); DP-SGD only supplies how gradients are produced.
    """
    optimizers = require("opacus.optimizers")
    sampling = require("opacus.utils.uniform_sampler")
    from lorakit.privacy.grad_sample import AdapterGradSampleModule

    sigma, q = plan(cfg, dp, len(data))
    expected = cfg.batch_size * cfg.grad_accum
    engine = Engine(model, cfg, driver=Driver.DP_SGD, hooks=hooks)  # seeds dropout and the like
    insecure_seed = cfg.seed if dp.dp_insecure_seed else None
    if dp.dp_insecure_seed:
        warn_insecure("DP-SGD")
    gsm = AdapterGradSampleModule(model)
    optimizer = optimizers.DPOptimizer(
        engine.optimizer,
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected,
        generator=private_generator(NOISE_STREAM, insecure_seed),
        secure_mode=True,  # noise robust to floating-point attacks (arXiv:2107.10138)
    )
    sampler = sampling.UniformWithReplacementSampler(
        num_samples=len(data),
        sample_rate=q,
        generator=private_generator(SAMPLING_STREAM, insecure_seed),
        steps=cfg.steps,
    )
    result = DPTrainResult(steps=0, seconds=0.0, delta=dp.delta, noise_multiplier=sigma, sample_rate=q)
    gradients = DPBackward(gsm, optimizer, data, iter(sampler), cfg.batch_size, engine.params, dp, sigma, q)
    with warnings.catch_warnings():
        # Adapters whose inputs need no gradient (the first layers) make PyTorch say so on every backward.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            engine.run(gradients, result, evaluate=evaluate, desc="dp-sgd", final_evaluation=False)
        finally:
            gsm.to_standard_module()  # removes Opacus' hooks and per-parameter attributes
    result.epsilons = gradients.epsilons
    result.epsilon = gradients.accountant.epsilon(dp.delta)
    if evaluate is not None:
        result.evals.append((result.steps, evaluate(model)))
    if cfg.progress:
        source = (
            "NOT private: noise derived from the seed" if dp.dp_insecure_seed else "noise from os.urandom"
        )
        print(
            f"privacy ({source}): epsilon {result.epsilon:.3f} at delta {dp.delta:g} "
            f"after {result.steps} steps "
            f"(noise multiplier {sigma:.4f}, sample rate {q:.4g}, clip {dp.max_grad_norm}, {dp.accountant}); "
            f"{NOT_RELEASED} are not released"
        )
    return result


class DPBackward(GradientSource):
    """DP-SGD's gradient seam: one Poisson-sampled logical batch per step, in physical chunks of
    ``batch_size``, clipped per example, summed, noised once and divided by the expected batch size; a
    data-independent ``extra_loss`` (AdaLoRA's orthogonality term) adds its gradient after the noise. Stops
    the run before a step that would exceed the privacy target."""

    clips_globally = False  # per-example clipping replaces the global clip of ``TrainConfig.clip``
    # The batch's loss and size are statistics of the private data that the accountant does not cover.
    releases_loss = False

    def __init__(
        self,
        gsm: nn.Module,
        optimizer: Any,
        data: TokenizedData,
        batches: Iterator[list[int]],
        batch_size: int,
        params: list[Tensor],
        dp: DPConfig,
        sigma: float,
        q: float,
    ) -> None:
        self.gsm, self.optimizer, self.data, self.batches = gsm, optimizer, data, batches
        self.batch_size, self.params, self.dp, self.sigma, self.q = batch_size, params, dp, sigma, q
        self.accountant = Accountant(dp.accountant)
        self.epsilons: list[float] = []  # after each step
        self.eps_next = 0.0

    def stop_before(self, step: int) -> str | None:
        self.eps_next = self.accountant.epsilon_after(self.dp.delta, self.sigma, self.q)
        target = self.dp.target_epsilon
        if target is not None and self.eps_next > target:
            return (
                f"stopped after {step} steps: one more would spend epsilon {self.eps_next:.3f} > "
                f"target {target} (delta {self.dp.delta})"
            )
        return None

    def backward(self, step: int, extra_loss: Callable[[int], Tensor | None]) -> float:
        """Leaves the privatised mean gradient in ``p.grad``; releases no loss (returns NaN)."""
        indices = next(self.batches)
        chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)] or [[]]
        for j, chunk in enumerate(chunks):
            if chunk:
                per_example_loss(self.gsm, self.data.batch(chunk)).mean().backward()
            for (
                p
            ) in self.params:  # an empty batch, or a tensor this forward did not use: zero per-example grads
                if getattr(p, "grad_sample", None) is None:
                    p.grad_sample = torch.zeros((len(chunk), *p.shape), dtype=p.dtype, device=p.device)
            if j < len(chunks) - 1:  # clip and accumulate this chunk; noise once, after the last
                self.optimizer.signal_skip_step(True)
                self.optimizer.pre_step()
                self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.pre_step()  # clip, sum, add noise, divide by the expected batch size
        extra = extra_loss(step)
        if extra is not None:  # data-independent regularisers: their gradient is added after the noise
            extra.backward()
        return math.nan

    def zero_grad(self, optimizer: Any) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # also clears the per-example gradients

    def after_step(self, step: int) -> dict[str, str]:
        self.accountant.step(self.sigma, self.q)
        self.epsilons.append(self.eps_next)
        return {"eps": f"{self.eps_next:.3f}"}


def check_job_private(job: Any, examples: int) -> None:
    """Refuse, before :func:`lorakit.jobs.job.run_job` writes anything, a DP job that cannot be honoured on
    ``examples`` training examples (see :func:`plan`), or that asks to resume."""
    if job.resume:
        raise PrivacyError("DP training cannot resume from a checkpoint (the accountant is not saved)")
    plan(job.train, job.privacy, examples)


def train_job_private(
    job: Any,
    model: nn.Module,
    data: TokenizedData,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
) -> tuple[DPTrainResult, dict[str, Any]]:
    """The DP branch of :func:`lorakit.jobs.job.run_job`: returns the result and the privacy report."""
    if job.resume:
        raise PrivacyError("DP training cannot resume from a checkpoint (the accountant is not saved)")
    result = train_dp(model, data, job.train, job.privacy, evaluate=evaluate)
    report = {
        **privacy_record("dp-sgd", result.epsilon, result.delta, job.privacy.dp_insecure_seed),
        "noise_multiplier": result.noise_multiplier,
        "sample_rate": result.sample_rate,
        "max_grad_norm": job.privacy.max_grad_norm,
        "accountant": job.privacy.accountant,
        "not_released": f"{NOT_RELEASED} (statistics of the private data)",
    }
    if result.stopped:
        report["stopped"] = result.stopped
    return result, report
