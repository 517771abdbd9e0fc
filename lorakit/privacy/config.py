"""Settings of differentially private training, and the range checks shared by DP-SGD and federated DP.

No optional dependency is imported here, so the job config and the CLI can carry these settings always.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

from lorakit.common.errors import LorakitError
from lorakit.common.settings import setting

ACCOUNTANTS = ("rdp", "prv")


class PrivacyError(LorakitError):
    """A privacy setting is out of range, or the privacy budget would be exceeded."""


def check_epsilon(value: float | None, name: str = "target_epsilon") -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise PrivacyError(f"{name} = {value!r} is invalid: epsilon must be a finite number > 0")


def check_delta(value: float, name: str = "delta") -> None:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise PrivacyError(
            f"{name} = {value!r} is invalid: delta must be in (0, 1), and well below 1/N for N people"
        )


def check_delta_below(delta: float, count: int, people: str, flag: str) -> None:
    """Refuse ``delta >= 1/count``: a mechanism that publishes each of ``count`` records outright with
    probability delta (one in expectation) meets (0, delta)-DP, so such a guarantee protects no one.
    ``count`` (training examples, clients) is public in the accountant's model."""
    bound = 1 / count
    if delta >= bound:
        advice = 10 ** math.floor(math.log10(0.1 / count))  # a power of ten at most a tenth of 1/count
        raise PrivacyError(
            f"delta {delta:g} is not below 1/N = 1/{count} = {bound:.3g} for N = {count} {people}: a delta "
            f"that large permits publishing one of them outright; pass {flag} below {bound:.3g} "
            f"(e.g. {flag} {advice:g})"
        )


def check_noise_target(noise_multiplier: float | None, target_epsilon: float | None) -> None:
    """No noise and a privacy budget contradict each other: the accountant's epsilon is infinite at once."""
    if noise_multiplier == 0 and target_epsilon is not None:
        raise PrivacyError(
            "noise_multiplier 0 adds no noise, so no target_epsilon can hold: leave noise_multiplier "
            "unset (the target sets it) or drop target_epsilon"
        )


def check_clipped_dtype(dtype: str) -> None:
    """Refuse trained tensors DP-SGD would clip in less than fp32: Opacus forms each example's gradient norm,
    its clip factor and the noised sum in the tensor's dtype, and a bf16 clipped gradient exceeds the bound
    by its rounding (0.35% measured), so the sensitivity the accountant assumes would not hold."""
    if dtype not in ("float32", "float64"):
        raise PrivacyError(
            f"DP-SGD cannot clip {dtype} gradients exactly: rounding lets a clipped gradient exceed the "
            "clipping bound the privacy guarantee rests on; keep the adapter in float32 (adapter_dtype "
            "float32, the default) under DP"
        )


def check_accountant(value: str) -> None:
    if value not in ACCOUNTANTS:
        raise PrivacyError(f"accountant = {value!r} is invalid: choose one of {ACCOUNTANTS}")


# The noise multipliers the accountants compute with: below, epsilon overflows (beyond any budget); above,
# their arithmetic fails (a subtraction under rounding). 0 is allowed: no noise, an infinite epsilon.
NOISE_RANGE = (1e-6, 1e6)


def check_noise_multiplier(value: float | None, name: str = "noise_multiplier") -> None:
    low, high = NOISE_RANGE
    if value is not None and not (isinstance(value, (int, float)) and (value == 0 or low <= value <= high)):
        raise PrivacyError(
            f"{name} = {value!r} is invalid: it must be 0 (no noise) or between {low:g} and {high:g}"
        )


@dataclass
class DPConfig:
    """DP-SGD (Abadi et al. 2016, arXiv:1607.00133): clip each example's gradient, add Gaussian noise."""

    dp: bool = setting(False, "train with DP-SGD (per-example clipping, Gaussian noise, Poisson sampling)")
    target_epsilon: float | None = setting(
        None, "privacy budget; sets the noise if none given; training stops there"
    )
    delta: float = setting(1e-5, "delta of (epsilon, delta)-DP; keep it well below 1/(training examples)")
    max_grad_norm: float = setting(1.0, "per-example gradient clipping bound C (DP-SGD)")
    noise_multiplier: float | None = setting(None, "noise std / C (default: chosen to spend target_epsilon)")
    accountant: str = setting("rdp", "privacy accountant: rdp | prv")
    dp_insecure_seed: bool = setting(
        False, "NOT private, tests only: DP noise and Poisson sampling from the seed instead of os.urandom"
    )

    def __post_init__(self) -> None:
        check_epsilon(self.target_epsilon)
        check_delta(self.delta)
        check_accountant(self.accountant)
        # The noise's standard deviation is noise_multiplier * max_grad_norm: an infinite bound or multiplier
        # turns every gradient into inf / NaN while the accountant still reports a finite epsilon.
        if not 0 < self.max_grad_norm < math.inf:
            raise PrivacyError(
                f"max_grad_norm = {self.max_grad_norm!r} is invalid: it must be a finite number > 0"
            )
        check_noise_multiplier(self.noise_multiplier)
        check_noise_target(self.noise_multiplier, self.target_epsilon)
        if self.dp and self.target_epsilon is None and self.noise_multiplier is None:
            raise PrivacyError(
                "DP training needs a budget or a noise level: pass --target-epsilon E or --noise-multiplier Z"
            )

    def check_used(self, named: Iterable[str] = ()) -> None:
        """Refuse DP settings given for a run without DP (a user's job: a saved one is read as it is): the
        run would train without privacy while its settings read as if it had some. ``named``: the settings
        the user wrote (a flag, a config key), refused even where they repeat a default (``--delta 1e-5``)."""
        default, now = {f.name: f.default for f in fields(self)}, vars(self)
        named = [name for name in named if name in default]
        given = [name for name in default if name != "dp" and (name in named or now[name] != default[name])]
        if given and not self.dp:
            flag = "--" + given[0].replace("_", "-")
            raise PrivacyError(
                f"{flag} ({given[0]}) applies to DP training, which is off, so the run would not be private: "
                f"add --dp (dp: true), or drop it"
            )
