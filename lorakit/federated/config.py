"""Settings of a federated run, as flat values: the same object is a CLI, a Flower run config and a job.

Flower's run config (``--run-config`` / ``[tool.flwr.app.config]``) holds only strings, numbers and booleans,
so an unset optional number is ``""`` there (None here; 0 is a number and is checked like any other), and the
variant's extra fields travel as a JSON string. Every number is read and range-checked by
:func:`lorakit.common.settings.check_fields`, as ``lorakit train``'s are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from lorakit.common.settings import (
    check_fields,
    check_settings,
    field_help,
    flag_type,
    parse_assignments,
    setting,
)
from lorakit.engine.config import SEEDS
from lorakit.privacy.config import (
    PrivacyError,
    check_accountant,
    check_delta,
    check_delta_below,
    check_epsilon,
    check_noise_multiplier,
    check_noise_target,
)

SAMPLINGS = ("poisson", "fixed")
PARTITIONS = ("iid", "label-skew")
# Settings of client-level DP alone, refused in a run without it (clip_norm 0).
DP_ONLY = ("delta", "accountant", "dp_insecure_seed")


@dataclass
class FedConfig:
    """Federated fine-tuning with DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963); DP-DyLoRA by default."""

    model: str = setting("minilm", "'minilm' (embedded), a local directory, or a Hugging Face id")
    variant: str = setting("dp_dylora", "any registered variant; dp_dylora draws one rank per round")
    rank: int = setting(8, "adapter rank (DyLoRA: the largest rank R)")
    alpha: float = setting(16.0, "scale numerator: the update is scaled by alpha / r")
    dropout: float = setting(0.0, "dropout on the adapter input (never on the base path)")
    targets: str = setting("query,key,value,dense", "comma-separated module-name suffixes, or 'all-linear'")
    options: str = setting("", "further variant fields as JSON, e.g. '{\"min_rank\": 2}'")
    data: str = setting("demo", "training data split among clients: .tsv/.csv/.jsonl path or 'demo'")
    eval_data: str = setting("", "server-side evaluation data (default: demo's test split for 'demo')")
    eval_examples: int | None = setting(
        None, "evaluate on the first N evaluation rows (unset: all)", within="[1, inf)"
    )
    text_column: str = setting("sentence", "classification text column")
    label_column: str = setting("label", "classification label column (class ids 0, 1, ... or class names)")
    num_labels: int | None = setting(
        None,
        "classes of the classification task (unset: counted from the training data; required under DP)",
        within="[2, 1000000]",
    )
    labels: str = setting(
        "", "class names in class-id order, comma-separated, when the labels are names (unset: from the data)"
    )
    max_length: int = setting(64, "tokens per example", within="[1, inf)")
    clients: int = setting(10, "N: clients (partitions of the data)", within="[1, inf)")
    rounds: int = setting(5, "federated rounds", within="[1, inf)")
    cohort: int = setting(5, "C: expected clients per round", within="[1, inf)")
    sampling: str = setting(
        "poisson", "poisson (each joins with q = C/N) | fixed (exactly C; with DP only C = N)"
    )
    partition: str = setting("iid", "iid | label-skew (Dirichlet label proportions per client)")
    skew: float = setting(
        0.5, "Dirichlet concentration for label-skew (smaller: more skewed)", within="(0, inf)"
    )
    local_steps: int = setting(10, "E: local optimizer steps per round on a client", within="[1, inf)")
    batch_size: int = setting(16, "client batch size", within="[1, inf)")
    lr: float = setting(5e-3, "client learning rate (AdamW, constant)", within="(0, inf)")
    server_lr: float = setting(
        1.0, "server learning rate applied to the aggregated update", within="(0, inf)"
    )
    noise_multiplier: float | None = setting(
        None, "sigma: server noise std / S (unset: from target_epsilon, else 0)", within="[0, inf)"
    )
    clip_norm: float = setting(
        0.0, "S: clip each client update to this L2 norm (0: no clipping, plain FedAvg)", within="[0, inf)"
    )
    target_epsilon: float | None = setting(
        None, "stop before exceeding it (unset: no budget); sets sigma when noise_multiplier is unset"
    )
    delta: float = setting(1e-5, "delta of client-level (epsilon, delta)-DP; keep it below 1/clients")
    accountant: str = setting("rdp", "rdp | prv")
    seed: int = setting(
        0, "seeds partitions, ranks and local training (never the DP noise or cohort)", within=SEEDS
    )
    dp_insecure_seed: bool = setting(
        False, "NOT private, tests only: derive DP noise and cohorts from the seed"
    )
    eval_every: int = setting(
        1, "evaluate on the server every N rounds (0: only at the end)", within="[0, inf)"
    )
    round_timeout: float = setting(600.0, "seconds to wait for a round's replies", within="(0, inf)")
    output_dir: str = setting("runs/federated", "adapter, metrics.json (per-round history)")
    overwrite: bool = setting(False, "replace an adapter already in output_dir")

    def __post_init__(self) -> None:
        check_fields(self, "federated")  # types and ranges, as for `lorakit train`
        names = self.label_list()
        checks = {
            "sampling": self.sampling in SAMPLINGS,
            "partition": self.partition in PARTITIONS,
            "labels": names is None or len(set(names)) == len(names) >= 2,
        }
        rules = {
            "sampling": f"one of {', '.join(SAMPLINGS)}",
            "partition": f"one of {', '.join(PARTITIONS)}",
            "labels": "at least 2 distinct class names, comma-separated",
        }
        check_settings(self, checks, "federated", rules)
        if self.cohort > self.clients:
            raise ValueError(
                f"cohort {self.cohort} is larger than the population of {self.clients} clients; "
                "choose cohort <= clients"
            )
        check_delta(self.delta)
        check_accountant(self.accountant)
        check_epsilon(self.target_epsilon)  # unset is None: 0 is refused like any epsilon <= 0
        check_noise_multiplier(self.noise_multiplier)
        check_noise_target(self.noise_multiplier, self.target_epsilon)
        if (self.noise_multiplier or self.target_epsilon is not None) and not self.clip_norm > 0:
            raise PrivacyError("client-level DP needs a clipping bound: set clip_norm S > 0 with the noise")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [name for name in DP_ONLY if getattr(self, name) != defaults[name]]
        if given and not self.private:  # the run would not be private while its settings read as if it were
            raise PrivacyError(
                f"--{given[0].replace('_', '-')} ({given[0]}) applies to client-level DP, which is off: set "
                "--clip-norm S > 0 (with noise) for DP-FedAvg, or drop it"
            )
        if self.accounted:  # the clients are the people of client-level DP; their number is public
            check_delta_below(self.delta, self.clients, "clients", "--delta")
        if self.accounted and self.sampling == "fixed" and self.cohort < self.clients:
            raise PrivacyError(
                f"a fixed cohort of {self.cohort} of {self.clients} clients is sampling without "
                "replacement, which the accountant (Poisson subsampling at q = C/N) does not cover: use "
                "sampling='poisson' (the default) or cohort = clients"
            )
        if self.private and self.eval_data == "clients":
            raise PrivacyError(
                "eval_data='clients' returns each client's accuracy and loss on its own data without noise, "
                "which client-level DP does not cover: give the server evaluation data (eval_data=PATH) or "
                "run without clip_norm"
            )
        self.variant_options()  # fail early on malformed JSON

    @property
    def private(self) -> bool:
        """DP-FedAvg aggregation (clip, noise, divide by the expected cohort) instead of plain FedAvg."""
        return self.clip_norm > 0

    @property
    def accounted(self) -> bool:
        """DP with noise: the accountant reports a finite epsilon for the Poisson-sampled cohorts."""
        return self.private and (bool(self.noise_multiplier) or self.target_epsilon is not None)

    @property
    def sample_rate(self) -> float:
        """``q = C / N``, the rate each client joins a round at (the accountant's sampling rate)."""
        return self.cohort / self.clients

    def variant_options(self) -> dict[str, Any]:
        return parse_options(self.options)

    def label_list(self) -> list[str] | None:
        names = [t.strip() for t in self.labels.split(",") if t.strip()]
        return names or None

    def target_list(self) -> str | list[str]:
        text = self.targets.strip()
        return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]

    def to_run_config(self) -> dict[str, Any]:
        """Flat values for Flower's run config (an unset number as ``""``: TOML has no null)."""
        return {k: "" if v is None else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_run_config(cls, values: dict[str, Any]) -> FedConfig:
        """Build from a Flower run config; unknown keys are an error naming the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown federated setting(s) {unknown}; valid settings: {', '.join(names)}")
        numbers = {
            name for name, hint in typing.get_type_hints(cls).items() if hint in (int | None, float | None)
        }
        return cls(**{k: None if v == "" and k in numbers else v for k, v in values.items()})


def parse_options(text: str) -> dict[str, Any]:
    """The ``options`` JSON object (variant fields beyond rank, alpha, dropout and targets)."""
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"options must be a JSON object, e.g. '{{\"min_rank\": 2}}': {err}") from None
    if not isinstance(options, dict):
        raise ValueError(f"options must be a JSON object, got {text!r}")
    return options


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`FedConfig` field; the field's ``help`` metadata is its help text."""
    for f in dataclasses.fields(FedConfig):
        flag = isinstance(f.default, bool)
        typed = {"action": argparse.BooleanOptionalAction} if flag else {"type": flag_type(FedConfig, f.name)}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"{field_help(f)} (default: {f.default!r})",
            **typed,
        )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a variant config field, e.g. --set min_rank=2 (repeatable; merged over --options)",
    )


def from_args(args: argparse.Namespace) -> FedConfig:
    """Flags as given; ``--set`` fields are folded into the ``options`` JSON (Flower's run config form)."""
    names = {f.name for f in dataclasses.fields(FedConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    assigned = parse_assignments(getattr(args, "set", []) or [])
    if assigned:
        values["options"] = json.dumps({**parse_options(values.get("options", "")), **assigned})
    return FedConfig(**values)
