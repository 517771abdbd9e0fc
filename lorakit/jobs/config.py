"""A job's settings, as a job file and the command line's flags give them: the model, the variant and its
budget, the data, training and privacy. Each is checked when it is set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lorakit
from lorakit.adapters.quantize import check_quant_type
from lorakit.common.errors import SettingError
from lorakit.common.settings import check_fields, check_settings, setting
from lorakit.core.config import ConfigError, VariantConfig
from lorakit.core.contract import Driver
from lorakit.data import datasets as D
from lorakit.jobs.models import TASKS
from lorakit.privacy.config import DPConfig, check_clipped_dtype
from lorakit.train.loop import TrainConfig


@dataclass
class DataConfig:
    """Where the data comes from and how to read it."""

    data: str = setting(
        "demo", "training data: a .tsv/.csv/.jsonl path, a Hugging Face dataset id, or 'demo'"
    )
    eval_data: str | None = setting(None, "evaluation data (default: the test split of 'demo', else none)")
    text_column: str = setting("sentence", "classification text column")
    label_column: str = setting("label", "classification label column (class ids 0, 1, ... or class names)")
    prompt_column: str = setting(D.PROMPT_COLUMN, "causal-LM prompt column: the user turn (no loss on it)")
    response_column: str = setting(
        D.RESPONSE_COLUMN, "causal-LM response column: the assistant turn (the loss covers it)"
    )
    messages_column: str = setting(
        D.MESSAGES_COLUMN,
        "causal-LM column of whole conversations (lists of {role, content}; the loss covers every assistant "
        "turn), used instead of the prompt and response columns where the data has it",
    )
    chat_template: str = setting(
        "auto",
        "causal LM: auto (the tokenizer's chat template, if it has one), none (prompt and response as plain "
        "text), or the path of a Jinja chat template",
    )
    max_length: int = setting(
        64, "tokens per example (longer ones are cut at the end, and counted)", within="[1, inf)"
    )
    group_by_length: bool | None = setting(
        None, "batch examples of similar length together (default: on for causal-lm, off for classification)"
    )
    eval_batch_size: int | None = setting(
        None,
        "examples per evaluation batch (default: 128 for classification, the batch size for causal-lm)",
        within="[1, inf)",
    )

    def eval_source(self) -> str | None:
        """The evaluation data a run reads: ``eval_data``, else the demo's test split when training on the
        demo, else none."""
        return self.eval_data or ("demo" if self.data == "demo" else None)

    def __post_init__(self) -> None:
        check_fields(self, "data")
        names = ("data", "text_column", "label_column", "prompt_column", "response_column", "messages_column")
        checks = {name: bool(getattr(self, name).strip()) for name in (*names, "chat_template")}
        checks["eval_data"] = self.eval_data is None or bool(self.eval_data.strip())
        check_settings(self, checks, "data", "it must be a name, not empty")


@dataclass
class JobConfig:
    """A whole fine-tuning job: model, variant, data and training settings."""

    model: str = setting("minilm", "'minilm' (embedded), a local directory, or a Hugging Face id")
    task: str | None = setting(
        None,
        "classification | causal-lm (default: causal-lm for a causal language model, else classification)",
    )
    num_labels: int | None = setting(
        None, "classes of a classification task (default: from the training data)", within="[2, 1000000]"
    )
    labels: list[str] | None = setting(
        None, "class names in class-id order when the labels are names (read from the training data)"
    )
    variant: str = setting("lora", "a registered variant name (see `lorakit list`)")
    targets: list[str] | str | None = setting(
        None,
        "layers to adapt: comma-separated name suffixes, a regex, or all-linear (default: all-linear for a "
        "causal LM; query,key,value,dense for classification, the BERT reference budget)",
    )
    rank: int | None = setting(None, "adapter rank r (unset: 8 where the variant takes it, else its own)")
    alpha: float | None = setting(
        None, "scale numerator: the update is scaled by alpha / r (unset: 16 where the variant takes it)"
    )
    dropout: float | None = setting(
        None, "dropout on the adapter input, never on the base path (unset: 0.05 where the variant takes it)"
    )
    adapter_dtype: str | None = setting(
        None,
        "how the adapter's own weights are stored: float32, or bfloat16 as in QLoRA's paper (half their "
        "memory and their optimizer state's) (unset: float32)",
    )
    options: dict[str, Any] = setting(doc="further variant config fields", factory=dict)
    quantize: str | None = setting(None, "'nf4' stores the frozen linear weights in 4 bits (QLoRA)")
    gradient_checkpointing: bool = setting(
        False,
        "recompute each transformer block in backward instead of keeping its activations: far less "
        "activation memory for about one more forward pass",
    )
    output_dir: str = setting("runs/lorakit", "where the adapter, metrics.json and checkpoints go")
    overwrite: bool = setting(False, "replace an adapter already in output_dir")
    resume: bool | str = setting(
        False, "continue from output_dir's checkpoint; auto: continue if there is one, else start (restarts)"
    )
    distributed: str | None = setting(
        None,
        "under torchrun: ddp (model replicated) or fsdp (FSDP2, frozen base sharded); batch-size is per rank",
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        check_fields(self, "job")
        if self.labels is not None:  # stripped and checked like the labels in the data
            self.labels = D.check_class_names(self.labels)
        checks = {
            "model": bool(self.model.strip()),
            "task": self.task is None or self.task in TASKS,
            "labels": self.labels is None or len(set(self.labels)) == len(self.labels) >= 2,
            "output_dir": bool(self.output_dir.strip()),
            "resume": self.resume in (True, False, "auto"),
        }
        rules = {
            "model": "a model name or path",
            "task": f"one of {', '.join(TASKS)}",
            "labels": "at least 2 distinct class names",
            "output_dir": "a directory path",
            "resume": "true, false or auto",
        }
        check_settings(self, checks, "job", rules)
        if self.gradient_checkpointing and self.privacy.dp:
            raise SettingError(
                "--gradient-checkpointing cannot run with --dp: DP-SGD's per-example gradients come from "
                "each layer's activations as forward captures them, which a recomputed block would capture "
                "twice; drop one of the two"
            )
        if self.train.checkpoint_every and self.privacy.dp:
            raise SettingError(
                "--checkpoint-every cannot run with --dp: DP training saves no checkpoints (a resumed run "
                "would restart the privacy accountant and under-report epsilon); drop --checkpoint-every"
            )
        if self.quantize is not None:
            check_quant_type(self.quantize)
        variant = self.variant_config()  # the variant's settings are checked now, before anything is read
        if self.privacy.dp:
            check_clipped_dtype(str(variant.get("adapter_dtype", "float32")))

    def variant_config(self) -> dict[str, Any]:
        """The variant's config fields: rank, alpha and dropout as set, then the options; a setting left unset
        takes the reference budget's value (:data:`BUDGET`) where the variant accepts it, else the variant's
        own default (AdaLoRA's rank follows its init_r, Delta-LoRA has no dropout)."""
        given = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout}
        given["adapter_dtype"] = self.adapter_dtype
        placed = {"targets": "set it with --targets", "train_modules": "a job trains its task's head"}
        placed |= {k: f"set it once, with --{k.replace('_', '-')}" for k, v in given.items() if v is not None}
        for name, fix in placed.items():  # one setting in two places: the second would silently win
            if name in self.options:
                raise SettingError(f"options (--set) sets '{name}', which is also set elsewhere: {fix}")
        config = {k: v for k, v in given.items() if v is not None} | self.options
        config_class = lorakit.get_variant(self.variant).config_class
        config_class.from_dict(config, self.variant)  # what the user set must hold as it is
        for name, value in BUDGET.items():
            if name not in config and _accepts(config_class, {**config, name: value}, self.variant):
                config[name] = value
        return config

    def check_task_settings(self) -> None:
        """Refuse settings of the other task once the task is known (from the model): classes for a causal
        language model, conversations and chat templates for a classifier. Either would be ignored."""
        default, d = DataConfig(), self.data
        if self.task == "causal-lm":
            given = {
                "--labels": self.labels is not None,
                "--num-labels": self.num_labels is not None,
                "--text-column": d.text_column != default.text_column,
                "--label-column": d.label_column != default.label_column,
            }
            why = "a causal language model is trained on prompts and responses, not classes"
        else:
            given = {
                "--prompt-column": d.prompt_column != default.prompt_column,
                "--response-column": d.response_column != default.response_column,
                "--messages-column": d.messages_column != default.messages_column,
                "--chat-template": d.chat_template != default.chat_template,
            }
            why = "a classifier is trained on texts and labels, not conversations"
        flags = [flag for flag, set_ in given.items() if set_]
        if flags:
            raise SettingError(f"{flags[0]} does not apply to this {self.task} model: {why}; drop it")

    def driver(self) -> Driver:
        """How the job trains, as a variant sees it (:meth:`lorakit.Variant.refusal`)."""
        if self.privacy.dp:
            return Driver.DP_SGD
        return Driver.DISTRIBUTED if self.distributed else Driver.LOOP

    def classes(self) -> D.ClassLabels | None:
        """The classes given or recorded (None until :func:`resolve_classes` counts them in the data)."""
        if self.labels is not None:
            return D.ClassLabels(self.num_labels or len(self.labels), tuple(self.labels))
        return D.ClassLabels(self.num_labels) if self.num_labels is not None else None


# The command line's reference budget for the settings every variant shares (the README's numbers use it).
BUDGET: dict[str, Any] = {"rank": 8, "alpha": 16.0, "dropout": 0.05}


def _accepts(config_class: type[VariantConfig], values: dict[str, Any], variant: str) -> bool:
    try:
        config_class.from_dict(values, variant)
    except ConfigError:
        return False
    return True
