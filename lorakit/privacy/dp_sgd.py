"""DP-SGD for any variant: Poisson-sampled batches, per-example clipping, Gaussian noise, and an accountant.

Abadi et al. 2016 (arXiv:1607.00133). Each optimizer step samples every training example independently with
probability ``q = batch_size * grad_accum / N``, clips each example's gradient over all trainable tensors
(adapters and trained head) to norm ``C``, sums, adds ``N(0, (sigma C)^2)`` to every coordinate and divides
by the expected batch size ``q N``. Opacus does the mechanics (GradSampleModule hooks with lorakit's adapter
rule, ``DPOptimizer``, ``UniformWithReplacementSampler``, RDP/PRV accountants).

The variants' hooks run as in :func:`lorakit.train.loop.train`, but ``on_after_backward`` and the optimizer
see only the privatised gradient, so whatever a hook derives from gradients (AdaLoRA's importance scores) is
post-processing and costs no privacy; a data-independent ``extra_loss`` (AdaLoRA's orthogonality term) is
added after the noise. The global gradient clip of ``TrainConfig.clip`` is replaced by per-example clipping.

The noise and the Poisson sample come from generators seeded from ``os.urandom`` (never stored), not from
``TrainConfig.seed``, which ``job.json`` records (:mod:`lorakit.privacy.randomness`); the noise uses Opacus'
``secure_mode``. The training loss and the batch sizes are statistics of the private data that the accountant
does not cover, so they are not reported; evaluation on held-out data is.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorakit
from lorakit.core.contract import Driver
from lorakit.core.variant import Hook
from lorakit.privacy import require
from lorakit.privacy.accountant import Accountant, noise_for_budget
from lorakit.privacy.config import DPConfig, PrivacyError
from lorakit.privacy.randomness import NOISE_STREAM, SAMPLING_STREAM, private_generator, warn_insecure
from lorakit.privacy.report import privacy_record
from lorakit.train.data import TokenizedData
from lorakit.train.loop import TrainConfig, TrainResult, lr_lambda, make_optimizer, progress_bar


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
    step that would exceed it. Epsilon after every step is in the result and on the progress bar.
    """
    lorakit.api.check_driver(model, Driver.DP_SGD)
    optimizers = require("opacus.optimizers")
    sampling = require("opacus.utils.uniform_sampler")
    from lorakit.privacy.grad_sample import AdapterGradSampleModule

    expected = cfg.batch_size * cfg.grad_accum
    if expected > len(data):
        raise PrivacyError(f"the expected batch ({expected}) exceeds the {len(data)} training examples")
    q = expected / len(data)
    sigma = dp.noise_multiplier
    if sigma is None:
        sigma = noise_for_budget(dp.target_epsilon, dp.delta, q, cfg.steps, dp.accountant)
    torch.manual_seed(cfg.seed)  # dropout and the like: not privacy-relevant, so reproducible
    insecure_seed = cfg.seed if dp.dp_insecure_seed else None
    if dp.dp_insecure_seed:
        warn_insecure("DP-SGD")
    hooks = lorakit.make_hooks(model, cfg.steps) if hooks is None else hooks
    base_optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_lambda(cfg))
    params = [p for g in base_optimizer.param_groups for p in g["params"]]
    gsm = AdapterGradSampleModule(model)
    optimizer = optimizers.DPOptimizer(
        base_optimizer,
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected,
        generator=private_generator(NOISE_STREAM, insecure_seed),
        secure_mode=True,  # noise robust to floating-point attacks (arXiv:2107.10138)
    )
    accountant = Accountant(dp.accountant)
    sampler = sampling.UniformWithReplacementSampler(
        num_samples=len(data),
        sample_rate=q,
        generator=private_generator(SAMPLING_STREAM, insecure_seed),
        steps=cfg.steps,
    )
    result = DPTrainResult(steps=0, seconds=0.0, delta=dp.delta, noise_multiplier=sigma, sample_rate=q)
    bar = progress_bar(cfg.steps, 0, cfg.progress, "dp-sgd")
    began = time.perf_counter()
    model.train()
    with warnings.catch_warnings():
        # Adapters whose inputs need no gradient (the first layers) make PyTorch say so on every backward.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for step, indices in enumerate(sampler):
                eps_next = accountant.epsilon_after(dp.delta, sigma, q)
                if dp.target_epsilon is not None and eps_next > dp.target_epsilon:
                    result.stopped = (
                        f"stopped after {step} steps: one more would spend epsilon {eps_next:.3f} > "
                        f"target {dp.target_epsilon} (delta {dp.delta})"
                    )
                    warnings.warn(result.stopped, stacklevel=2)
                    break
                _dp_step(gsm, optimizer, data, indices, cfg.batch_size, params, hooks, step)
                accountant.step(sigma, q)
                for hook in hooks:
                    hook.on_after_step(step)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.epsilons.append(eps_next)
                result.steps = step + 1
                bar.update(1)
                bar.set_postfix(eps=f"{eps_next:.3f}", refresh=False)
                if evaluate is not None and cfg.eval_every and result.steps % cfg.eval_every == 0:
                    if result.steps < cfg.steps:
                        result.evals.append((result.steps, evaluate(model)))
                        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.evals[-1][1].items())
                        bar.write(f"step {result.steps}: {metrics}, epsilon {eps_next:.3f}")
                        model.train()
        finally:
            bar.close()
            gsm.to_standard_module()  # removes Opacus' hooks and per-parameter attributes
    result.seconds = time.perf_counter() - began
    result.epsilon = accountant.epsilon(dp.delta)
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
            "training losses and batch sizes are not released"
        )
    return result


def _dp_step(
    gsm: nn.Module,
    optimizer: object,
    data: TokenizedData,
    indices: list[int],
    batch_size: int,
    params: list[Tensor],
    hooks: list[Hook],
    step: int,
) -> None:
    """One DP-SGD step over a Poisson-sampled logical batch, in physical chunks of ``batch_size``; leaves the
    privatised mean gradient in ``p.grad``, runs ``on_after_backward`` and the optimizer update. The batch's
    loss and size are statistics of the private data that the accountant does not cover: neither leaves."""
    for hook in hooks:
        hook.on_step_start(step)
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)] or [[]]
    for j, chunk in enumerate(chunks):
        if chunk:
            per_example_loss(gsm, data.batch(chunk)).mean().backward()
        for p in params:  # an empty batch, or a tensor this forward did not use: zero per-example gradients
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((len(chunk), *p.shape), dtype=p.dtype, device=p.device)
        if j < len(chunks) - 1:  # clip and accumulate this chunk; noise once, after the last
            optimizer.signal_skip_step(True)
            optimizer.pre_step()
            optimizer.zero_grad(set_to_none=True)
    optimizer.pre_step()  # clip, sum, add noise, divide by the expected batch size
    extra = [e for e in (hook.extra_loss(step) for hook in hooks) if e is not None]
    if extra:  # data-independent regularisers: their gradient is added after the noise
        sum(extra).backward()
    for hook in hooks:
        hook.on_after_backward(step)
    for hook in hooks:
        hook.on_before_optimizer_step(step)
    optimizer.original_optimizer.step()


def train_job_private(
    job: Any,
    model: nn.Module,
    data: TokenizedData,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
) -> tuple[DPTrainResult, dict[str, Any]]:
    """The DP branch of :func:`lorakit.train.job.run_job`: returns the result and the privacy report."""
    lorakit.api.check_driver(model, Driver.DP_SGD)  # e.g. stages on the data that DP does not account for
    if job.resume:
        raise PrivacyError("DP training cannot resume from a checkpoint (the accountant is not saved)")
    if job.train.checkpoint_every:
        warnings.warn(
            "DP training writes no intermediate checkpoints; checkpoint_every is ignored", stacklevel=2
        )
    result = train_dp(model, data, job.train, job.privacy, evaluate=evaluate)
    report = {
        **privacy_record("dp-sgd", result.epsilon, result.delta, job.privacy.dp_insecure_seed),
        "noise_multiplier": result.noise_multiplier,
        "sample_rate": result.sample_rate,
        "max_grad_norm": job.privacy.max_grad_norm,
        "accountant": job.privacy.accountant,
        "not_released": "training losses and batch sizes (statistics of the private data)",
    }
    if result.stopped:
        report["stopped"] = result.stopped
    return result, report
