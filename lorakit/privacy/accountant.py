"""Privacy accounting for repeated subsampled Gaussian mechanisms, with Opacus' RDP or PRV accountant.

One mechanism per DP-SGD step (examples Poisson-sampled at rate ``q``, noise ``sigma * C``) or per federated
round (clients sampled at rate ``q``, noise ``sigma * S``). The accountant composes them and converts to
``(epsilon, delta)``: RDP (Mironov 2017, arXiv:1702.07476; subsampling by Mironov et al. 2019,
arXiv:1908.10530; conversion by Balle et al. 2020, arXiv:1905.09982) or PRV (Gopi et al. 2021,
arXiv:2106.02848).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

from lorakit.privacy import require
from lorakit.privacy.config import PrivacyError, check_accountant, check_delta, check_epsilon

# The largest epsilon each accountant computes reliably: PRV's numerics saturate just below log of the
# largest double (about 709.8) and report less than was spent; RDP's noise search stops converging once
# epsilon outgrows its 0.01 tolerance in doubles. A budget above these is no privacy guarantee anyway.
EPSILON_CEILING = {"rdp": 1e6, "prv": 700.0}
# What PRV's numerics fail with on an extreme noise level (a histogram beyond memory, a discretisation that
# breaks down): the RDP bound, always valid, is reported instead.
_NUMERIC_FAILURES = (ArithmeticError, MemoryError, RuntimeError, ValueError)


def _check_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate {sample_rate!r} is invalid: it must be in (0, 1]")


class Accountant:
    """``(epsilon, delta)`` spent so far by a sequence of subsampled Gaussian mechanisms."""

    def __init__(self, kind: str = "rdp") -> None:
        check_accountant(kind)
        accountants = require("opacus.accountants")
        self.kind = kind
        self._opacus = accountants.create_accountant(kind)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` runs, as Opacus stores them (equal runs are merged)."""
        return list(self._opacus.history)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._opacus.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` mechanisms at ``sample_rate``, noise ``noise_multiplier`` (std / sensitivity)."""
        _check_rate(sample_rate)
        if noise_multiplier < 0:
            raise PrivacyError(f"noise multiplier {noise_multiplier!r} is invalid: it must be >= 0")
        for _ in range(steps):
            self._opacus.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (``inf`` once any mechanism had no noise, 0 before any; never
        negative)."""
        check_delta(delta)
        history = self._opacus.history
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf
        # The RDP-to-(epsilon, delta) conversion can come out below 0 for a large delta. A guarantee with
        # epsilon < 0 implies the one with epsilon = 0 and says nothing a reader can use beyond it: report 0.
        return max(0.0, self._epsilon(delta))

    def _epsilon(self, delta: float) -> float:
        """Opacus' epsilon; where PRV cannot compute it (or saturates), RDP's bound for the same history."""
        if self.kind == "prv":
            try:
                epsilon = float(self._opacus.get_epsilon(delta=delta))
            except _NUMERIC_FAILURES:
                epsilon = math.inf
            if epsilon < EPSILON_CEILING["prv"]:
                return epsilon
            warnings.warn(
                "the PRV accountant cannot compute this epsilon (beyond its numeric range); the RDP bound, "
                "always valid, is reported instead",
                UserWarning,
                stacklevel=3,
            )
            rdp = Accountant("rdp")
            rdp._opacus.history = list(self._opacus.history)
            return rdp._epsilon(delta)
        return float(self._opacus.get_epsilon(delta=delta))

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float:
        """Epsilon that ``steps`` more mechanisms would bring the total to, without recording them."""
        ahead = copy.deepcopy(self)
        ahead.step(noise_multiplier, sample_rate, steps)
        return ahead.epsilon(delta)


def run_noise(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: str,
    unit: str,
    fix: str,
) -> float:
    """The noise multiplier of a run of ``steps`` mechanisms (DP-SGD's steps, federated rounds): the one
    given, else the smallest that spends ``target_epsilon`` in them, else 0 (no target). A target that one
    ``unit`` (a step, a round) already exceeds is refused: that epsilon depends only on the settings, and
    such a run would stop before it trains and save an untrained adapter recorded as private. ``fix``: what
    to change, in the caller's terms."""
    if noise_multiplier is not None:
        sigma = noise_multiplier
    elif target_epsilon is not None:
        sigma = noise_for_budget(target_epsilon, delta, sample_rate, steps, kind)
    else:
        return 0.0
    if target_epsilon is not None:
        first = Accountant(kind).epsilon_after(delta, sigma, sample_rate)
        if first > target_epsilon:
            raise PrivacyError(
                f"--target-epsilon {target_epsilon:g} cannot pay for one {unit}: one {unit} at noise "
                f"multiplier {sigma:g} and sample rate {sample_rate:.4g} spends epsilon {first:.4g} (delta "
                f"{delta:g}); {fix}"
            )
    return sigma


def noise_for_budget(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp"
) -> float:
    """The smallest noise multiplier whose ``steps`` mechanisms at ``sample_rate`` spend ``target_epsilon``
    (Opacus' ``get_noise_multiplier``: binary search to within 0.01 of epsilon, never above the target)."""
    check_epsilon(target_epsilon)
    check_delta(delta)
    check_accountant(kind)
    _check_rate(sample_rate)
    if steps < 1:
        raise PrivacyError(f"steps = {steps!r} is invalid: at least one step or round must run")
    if target_epsilon > EPSILON_CEILING[kind]:
        other = " (the rdp accountant reaches higher)" if kind == "prv" else ""
        raise PrivacyError(
            f"--target-epsilon {target_epsilon:g} is beyond what the {kind} accountant computes reliably "
            f"(at most {EPSILON_CEILING[kind]:g}){other}; such a budget guarantees nothing: pass a smaller "
            "one"
        )
    return _search_noise(float(target_epsilon), float(delta), float(sample_rate), int(steps), kind)


@functools.lru_cache(maxsize=16)
def _search_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str) -> float:
    """:func:`noise_for_budget` after its checks; remembered, since a run's checks before training and the
    training itself ask for the same search, which takes seconds."""
    utils = require("opacus.accountants.utils")
    try:
        with warnings.catch_warnings():  # the search probes noise levels whose best RDP order is extreme
            warnings.filterwarnings("ignore", message="Optimal order is the")
            sigma = utils.get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=kind,
            )
        return float(sigma)
    except _NUMERIC_FAILURES as err:  # the budget cannot be met at any noise level Opacus tries or computes
        raise PrivacyError(
            f"no noise level spends epsilon {target_epsilon} at delta {delta} over {steps} steps "
            f"at sample rate {sample_rate:.4g} ({kind} accountant: {type(err).__name__}: {err})"
        ) from None
