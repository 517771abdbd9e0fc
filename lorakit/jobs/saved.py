"""A finished run's adapter directory, as ``eval``, ``merge``, ``export`` and ``generate`` read it, and what
they make of it.

:func:`saved_job` checks the directory once for all of them and refuses, naming the fix, what is no finished
adapter: a training checkpoint, the unfinished run beside an output directory, a run that was interrupted
before its first adapter (``--resume`` continues it), one a running command is writing (wait for it),
a directory without ``adapter.json``.
:func:`load_adapted` loads the base the job names, with its classes, and the adapter onto it.
:func:`write_merged` and :func:`write_peft` build their output beside the target and swap it in
(:func:`lorakit.common.dirswap.building`) while holding the target's lock, carrying what the model needs
downstream: class names, tokenizer (and its chat template), generation config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

import lorakit
import lorakit.common.dirlock as dirlock
from lorakit.adapters.io import CONFIG_FILE, PEFT_CONFIG_FILE, WEIGHTS_FILE, AdapterFileError, read_meta
from lorakit.common.dirswap import building, siblings, staged_for
from lorakit.jobs.config import DataConfig, JobConfig
from lorakit.jobs.job import adopt_run_template
from lorakit.jobs.models import infer_task, load_model, name_classes, resolve_model
from lorakit.jobs.rundir import JOB_FILE, part_of_run
from lorakit.train.checkpoint import TRAINER_FILE, checkpoint_step, has_checkpoint
from lorakit.train.loop import TrainConfig


def saved_job(adapter: str) -> JobConfig | None:
    """The job that trained the adapter in ``adapter`` (None: the directory has an adapter but no
    ``job.json``); refuses a directory that holds no finished adapter, naming what it is and the fix."""
    path = Path(adapter)
    _check_finished(path, adapter)
    read_meta(path)  # format, fields and variant of adapter.json
    file = path / JOB_FILE
    if not file.is_file():
        return None
    from lorakit.privacy.config import DPConfig

    # a job.json written before a section existed lacks it: that section takes its defaults
    sections = {"data": DataConfig, "train": TrainConfig, "privacy": DPConfig}
    try:
        raw = json.loads(file.read_text())
        job = JobConfig(**{**raw, **{k: cls(**raw.get(k, {})) for k, cls in sections.items()}})
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise AdapterFileError(
            f"cannot read {file}: {' '.join(str(err).split())[:300]}; it must be the {JOB_FILE} `lorakit "
            "train` wrote (restore it, or train again)"
        ) from None
    # a job.json written before the classes were recorded: two classes, as then
    return job if job.task != "classification" or job.num_labels else dataclasses.replace(job, num_labels=2)


def eval_source(job: JobConfig | None, adapter: str, data: str | None) -> str:
    """The data to evaluate on: ``data`` (``--data``) or the job's evaluation data; without either, an error
    saying to pass ``--data``, never a fallback to other data."""
    if data:
        return data
    if job is None:
        raise AdapterFileError(
            f"{adapter} has no {JOB_FILE} (`lorakit train` writes it), so which data the adapter was made "
            "for is unknown: pass --data PATH"
        )
    source = job.data.eval_data or ("demo" if job.data.data == "demo" else None)
    if source is None:
        raise AdapterFileError(f"the job in {adapter} had no evaluation data: pass --data PATH")
    return source


def load_adapted(adapter: str) -> tuple[JobConfig, nn.Module, Any]:
    """``(job, model, tokenizer)``: the base the adapter was trained on, with its classes named in its config,
    quantised as in training, with the adapter loaded; a causal LM's tokenizer carries the run's chat
    template. Without ``job.json`` the base, task and number of classes are read from the adapter itself."""
    job = saved_job(adapter) or _job_from_adapter(adapter)
    model, tokenizer = load_model(job.model, job.task, job.num_labels or 2)
    if job.task == "causal-lm":  # prompts rendered, and a merged tokenizer's template, as in training
        adopt_run_template(job, tokenizer, adapter)
    name_classes(model, job.labels)
    if job.quantize:
        from lorakit.adapters.quantize import quantize

        quantize(model, job.quantize)
    lorakit.load(model, adapter)
    return job, model, tokenizer


def write_merged(adapter: str, out: str) -> None:
    """Fold the adapter into its base and save the plain model (safetensors), its tokenizer and, for a causal
    LM, its generation config to the new or empty directory ``out``."""
    target = dirlock.real_path(out)
    _refuse_inside_run(target, out, "merged model", "merged")
    _refuse_not_empty(target, out)
    with dirlock.exclusive(target, out, "lorakit merge"):
        _refuse_not_empty(target, out)
        _, model, tokenizer = load_adapted(adapter)
        merged = lorakit.merge(model)
        from lorakit.adapters.quantize import dequantize

        dequantize(merged)  # 4-bit layers the adapter did not touch become dense too: a merged model is plain
        with building(target, out, "the merged model") as new:
            merged.save_pretrained(new, safe_serialization=True)  # config (class names), generation config
            tokenizer.save_pretrained(new)  # with its chat template


def write_peft(adapter: str, out: str, rank: int | None, overwrite: bool) -> None:
    """Write the adapter in PEFT's format to ``out`` with the tokenizer (and its chat template) and, for a
    causal LM, the generation config; an adapter already there is replaced only with ``overwrite``."""
    from lorakit.interop import save_peft

    target = dirlock.real_path(out)
    _refuse_inside_run(target, out, "PEFT adapter", "peft")
    with dirlock.exclusive(target, out, "lorakit export"):
        if (target / PEFT_CONFIG_FILE).exists() and not overwrite:
            raise lorakit.OutputExistsError(
                f"{out} already holds a PEFT adapter ({PEFT_CONFIG_FILE}); pass --overwrite to replace it, "
                "or choose another --out"
            )
        if not overwrite:  # a tokenizer or template of the user's would be replaced by the adapter's
            _refuse_not_empty(target, out, "the PEFT adapter", "pass --overwrite to replace its files, or ")
        job, model, tokenizer = load_adapted(adapter)
        if rank is not None:
            lorakit.set_rank(model, rank)
        with building(target, out, "the PEFT adapter") as new:
            save_peft(model, new)
            tokenizer.save_pretrained(new)
            if job.task != "classification" and model.generation_config is not None:
                model.generation_config.save_pretrained(new)


def _check_finished(path: Path, shown: str) -> None:
    """Refuse a training checkpoint or an unfinished run as if it were a finished adapter, naming the fix."""
    if (path / TRAINER_FILE).is_file():
        run = path.absolute().parent
        raise AdapterFileError(f"{shown} is a training checkpoint, not a finished adapter: {_about_run(run)}")
    if staged_for(path.absolute()) is not None:
        raise AdapterFileError(
            f"{shown} is an unfinished run, not a finished adapter: {_about_run(path.absolute())}"
        )
    running = dirlock.holder(path)
    if not (path / CONFIG_FILE).is_file() and running is not None:
        raise AdapterFileError(f"{shown} holds no adapter yet: {_running(running)}")
    if not (path / CONFIG_FILE).is_file() and has_checkpoint(siblings(path.absolute())[0]):
        run = siblings(path.absolute())[0]
        raise AdapterFileError(f"{shown} holds no adapter yet: {_about_run(run)}")


def _about_run(run: Path) -> str:
    """Where the run that wrote checkpoint directory ``run`` (or its staging directory) stands; the fix."""
    output = staged_for(run)
    running = dirlock.holder(output) if output is not None else None
    if running is not None:
        return _running(running)
    if output is not None:
        step = checkpoint_step(run)
        at = f" at the checkpoint of step {step}" if step is not None else ""
        resume = f"`lorakit train ... --output-dir {output} --resume`"
        return f"the run into {output} was interrupted{at}; {resume} continues it"
    if (run / CONFIG_FILE).is_file():
        return f"the run's adapter is {run}; pass that directory"
    return f"its run has not finished; `lorakit train ... --output-dir {run} --resume` continues it"


def _running(command: str) -> str:
    return f"it is being written by a running command ({command}); wait for it to finish"


def _job_from_adapter(adapter: str) -> JobConfig:
    """A job for an adapter saved without ``job.json``: its base model, classification when it saved a trained
    head (else causal LM), and as many classes as that head has. A causal LM's own head or embedding trained
    whole (``train_modules=["lm_head"]``) is no classification head: its saved rows are the vocabulary."""
    meta = read_meta(adapter)
    model = meta.get("base_model") or "minilm"
    task = "classification" if meta["train_modules"] else "causal-lm"
    if task == "classification" and _vocabulary_rows(
        model, Path(adapter) / WEIGHTS_FILE, meta["train_modules"]
    ):
        task = "causal-lm"
    job = JobConfig(model=model, variant=meta["variant"], task=task)
    if task != "classification":
        return job
    base, _ = load_model(job.model, task, 2)
    return dataclasses.replace(job, num_labels=_head_classes(base, Path(adapter) / WEIGHTS_FILE))


def _vocabulary_rows(model: str, weights: Path, modules: list[str]) -> bool:
    """Whether a causal LM ``model``'s fully trained ``modules`` saved in ``weights`` have a row per token of
    its vocabulary (its output head or embedding), as no classification head has."""
    if infer_task(model) != "causal-lm":
        return False
    from transformers import AutoConfig

    vocabulary = AutoConfig.from_pretrained(resolve_model(model)).get_text_config().vocab_size
    owned = tuple(f"{m}." for m in modules)
    try:
        with safe_open(str(weights), "pt") as saved:
            shapes = [saved.get_slice(k).get_shape() for k in saved.keys() if k.startswith(owned)]  # noqa: SIM118
    except Exception:  # noqa: BLE001 - unreadable: lorakit.load names the problem when it reads the file
        return False
    return any(shape and shape[0] == vocabulary for shape in shapes)


def _head_classes(base: nn.Module, weights: Path) -> int:
    """The number of classes of the head saved in ``weights``: the first size of a saved head tensor where the
    two-class ``base`` has 2 (its other sizes equal); 2 if none differs."""
    try:
        with safe_open(str(weights), "pt") as saved:
            shapes = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - unreadable: lorakit.load names the problem when it reads the file
        return 2
    for key, tensor in base.state_dict().items():
        shape = shapes.get(key)
        if shape and tensor.dim() and tensor.shape[0] == 2 and shape[1:] == tuple(tensor.shape[1:]):
            return int(shape[0])
    return 2


def _refuse_inside_run(target: Path, shown: str, what: str, suffix: str) -> None:
    """Refuse an output directory that is a lorakit run, or one of the entries a run writes (its checkpoint
    folder above all), which a re-run or ``--resume`` replaces. A new folder inside a run is left alone (a
    re-run refuses to replace a directory holding it)."""
    found = part_of_run(target)
    if found is not None:
        run, entry = found
        where = f"is part of the lorakit run {run}" if entry else "is a lorakit run directory"
        beside = run.parent / f"{run.name}-{suffix}"
        raise lorakit.OutputExistsError(
            f"{shown} {where}; write the {what} to a new directory, e.g. {beside}"
        )


def _refuse_not_empty(target: Path, shown: str, what: str = "the merged model", fix: str = "") -> None:
    """Refuse an output that is a file or a directory holding anything: what is there may be the user's."""
    if target.exists() and not target.is_dir():
        raise lorakit.OutputExistsError(f"{shown} is a file; choose a new directory for {what}")
    if target.exists() and any(target.iterdir()):
        raise lorakit.OutputExistsError(f"{shown} is not empty; {fix}choose a new directory for {what}")
