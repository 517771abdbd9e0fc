"""Saving and loading adapters: ``adapter.json`` (what and where) + ``adapter.safetensors`` (tensors only).

Only safetensors is read, so loading an adapter never unpickles anything. A tensor shared by several layers
(VeRA's projections, LoRA-drop's shared pairs) is stored once and listed under ``"tied"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import lorakit.common.dirlock as dirlock
from lorakit.adapters.api import QUANTIZED_DTYPE, adapted_layers, apply_saved, info, release, takes_compiled
from lorakit.adapters.targets import set_module
from lorakit.common.dirswap import finish_swap
from lorakit.common.errors import DiskFullError, LorakitError, OutputExistsError, is_disk_full
from lorakit.core import ranks
from lorakit.variants import get_variant

CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"  # what marks a PEFT adapter directory (lorakit.load_peft reads it)
FORMAT = "lorakit-adapter"
FORMAT_VERSION = 1


def lorakit_version() -> str:
    """The version of the installed lorakit, from its package metadata ("unknown" in an uninstalled tree)."""
    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "unknown"


class AdapterFileError(LorakitError):
    """An adapter directory is missing, unreadable, or does not fit the model."""


class NonFiniteError(LorakitError):
    """A loss, gradient or adapter tensor that must be finite is NaN or infinite."""


@takes_compiled
def save(model: nn.Module, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the model's adapter (and fully trained modules) to ``directory``; returns the directory.

    Refuses to replace an existing adapter unless ``overwrite=True``, and refuses tensors holding NaN or
    infinite values (:class:`NonFiniteError` naming them). Files are written to a temporary name and renamed,
    and ``adapter.json`` records the SHA-256 of the weights file, so an interrupted or mixed save is detected
    on load instead of silently pairing one save's config with another's weights.
    """
    state = info(model)
    out = Path(directory)
    check_output_dir(out, (CONFIG_FILE, WEIGHTS_FILE), "an adapter", overwrite)
    tensors, tied = _collect_tensors(model)
    check_finite_tensors(tensors, f"the adapter was not saved to {out}")
    weights = safetensors_bytes(tensors, {"format": FORMAT})
    with writing(out, "the adapter"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / WEIGHTS_FILE, lambda path: Path(path).write_bytes(weights))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorakit_version": lorakit_version(),
        "variant": state.variant,
        "config": state.config.to_dict(),
        "base_model": state.base_model,
        "fingerprint": state.fingerprint,
        "targets": state.targets,
        "train_modules": state.train_modules,
        "tied": tied,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "base_dtypes": state.base_dtypes,
        "base_sample": state.base_sample,
        **_chosen_rank(model),
    }
    with writing(out, "the adapter"):
        atomic_write(out / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def _chosen_rank(model: nn.Module) -> dict[str, int]:
    """``{"chosen_rank": b}`` where ``lorakit.set_rank`` chose a rank below the largest (DyLoRA), so that
    :func:`load` gives back the model as it was saved; every rank's tensors are saved either way."""
    choices = ranks.rank_choices(model)
    if choices is None:
        return {}
    rank = adapted_layers(model)[0][1].variant.rank
    return {} if rank == choices[-1] else {"chosen_rank": rank}


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes, written by Python's own file calls so that a full disk is an ``OSError``
    naming ENOSPC (safetensors' own writer reports it as a generic error)."""
    return safetensors.torch.save(tensors, metadata=metadata)


def check_output_dir(out: Path, files: tuple[str, ...], what: str, overwrite: bool) -> None:
    """Refuse to write ``files`` into ``out`` when that would replace a file already there (unless
    ``overwrite``; also a lone weights file: what the user saved is never replaced unasked) or when ``out``
    (or a parent) is a file."""
    blocking = file_in_the_way(out)
    if blocking is not None:
        raise AdapterFileError(f"cannot save {what} to {out}: {blocking} is a file, not a directory")
    present = [name for name in files if (out / name).exists()]
    if present and not overwrite:
        raise OutputExistsError(
            f"{out} already holds {what} ({', '.join(present)}); choose another directory or pass "
            "overwrite=True"
        )


def file_in_the_way(path: Path) -> Path | None:
    """The file at ``path`` or at its nearest existing parent, which keeps a directory from being made there
    (None: there is none)."""
    for place in (path, *path.parents):
        if place.exists():
            return None if place.is_dir() else place
    return None


@contextlib.contextmanager
def writing(out: Path, what: str) -> Any:
    """Turn an operating-system refusal while writing ``what`` into ``out`` into a :class:`DiskFullError`
    (no space left) or an :class:`AdapterFileError` (any other), naming the place."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(
                f"no space left on {out}: {what} was not saved completely; free space and save again"
            ) from None
        raise AdapterFileError(
            f"cannot write to {out}: {err.strerror or err} ({err.filename or out}); choose a writable "
            "directory"
        ) from None


def check_same_base(
    meta: dict[str, Any], sample: list[list[float] | None], model: nn.Module, directory: Any
) -> None:
    """For a base whose exact fingerprint differs from the adapter's: accept it only as the same base held in
    another dtype; otherwise undo the adapter and refuse, naming the dtypes when they differ."""
    now = info(model).base_dtypes
    if same_base_in_another_dtype(meta, sample, now):
        return
    quantised = any(layer.weight_is_dequantised() for _, layer in adapted_layers(model))
    undo_apply(model)
    saved = meta.get("base_dtypes")  # absent in adapters saved before it was recorded
    saved_quantised = isinstance(saved, list) and any(str(d).startswith(QUANTIZED_DTYPE) for d in saved)
    if saved_quantised and not quantised:
        raise AdapterFileError(
            f"the adapter in {directory} was trained on a quantised base ({', '.join(map(str, saved))}) but "
            "this model's adapted layers are not quantised: quantise it as it was (lorakit.quantize, or the "
            "job's --quantize) before loading"
        )
    if quantised and isinstance(saved, list) and saved and saved != now:  # another dtype moved 4-bit codes
        raise AdapterFileError(
            f"the adapter in {directory} was trained on a quantised base whose codes must match exactly "
            f"({', '.join(map(str, saved))}), and this model's targeted weights quantise to other codes "
            f"({', '.join(now)}): load the base it was trained on in the dtype it was loaded in then"
        )
    if isinstance(saved, list) and saved and saved != now:
        raise AdapterFileError(
            f"the adapter in {directory} was trained on a base in {', '.join(map(str, saved))} but this "
            f"model's adapted layers are {', '.join(now)}, and their weights differ by more than that "
            f"rounding: load it onto the base it was trained on"
        )
    named = f" ({meta['base_model']})" if meta.get("base_model") else ""
    raise AdapterFileError(
        f"the adapter in {directory} was trained on a different base model{named}: its weights do not match "
        "this model's. Load it onto the base it was trained on."
    )


def check_same_targets(saved: list[Any], model: nn.Module, directory: Path) -> None:
    """The adapter's config selects other layers on ``model`` than the adapter file lists: undo the adapter
    and refuse, naming the cause: layers the model lacks (another base), or lists that disagree on this
    model (another base with the same layer names, or an edited ``adapter.json``)."""
    adapted = [name for name, _ in adapted_layers(model)]
    undo_apply(model)
    modules = dict(model.named_modules())
    missing = [str(name) for name in saved if str(name) not in modules]
    if missing:
        raise AdapterFileError(
            f"the adapter in {directory} adapts layers this model does not have ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}): load it onto the base it was trained on"
        )
    shown = ", ".join(adapted[:3]) + (" ..." if len(adapted) > 3 else "")
    raise AdapterFileError(
        f"{directory / CONFIG_FILE}: its config's targets select {len(adapted)} layer(s) on this model "
        f"({shown}), not the {len(saved)} its targets list names: this model is not the base it was trained "
        "on, or the file was edited; load it onto its base, or restore the file"
    )


def same_base_in_another_dtype(
    meta: dict[str, Any], sample: list[list[float] | None], now_dtypes: list[str]
) -> bool:
    """Whether ``model``'s targeted base is the adapter's base held in another dtype: the dtypes differ and
    the sampled values (:func:`lorakit.adapters.api.base_sample`) agree to the rounding of the coarser dtype
    (each cast rounds to within half its epsilon, relative). Integer tensors (packed 4-bit codes) must match
    exactly, which only the fingerprint checks, so a base holding them is never accepted here."""
    saved, saved_dtypes = meta.get("base_sample"), meta.get("base_dtypes")
    if not isinstance(saved, list) or not isinstance(saved_dtypes, list) or saved_dtypes == now_dtypes:
        return False
    if None in sample or None in saved or len(saved) != len(sample):
        return False
    try:
        coarse = max(
            (torch.finfo(getattr(torch, d)) for d in {*saved_dtypes, *now_dtypes}), key=lambda f: f.eps
        )
        want, got = torch.tensor(saved, dtype=torch.float64), torch.tensor(sample, dtype=torch.float64)
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a file edited by hand: not recognised
        return False
    if want.shape != got.shape:
        return False
    bound = coarse.eps * torch.maximum(want.abs(), got.abs()) + coarse.tiny
    return bool(((want - got).abs() <= bound).all())


def _collect_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All adapter tensors by key, each storage once; ``tied`` maps repeated keys to the stored key."""
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    first_key: dict[int, str] = {}
    items = [
        (f"{n}.{k}", t)
        for n, layer in adapted_layers(model)
        for k, t in layer.variant.adapter_state().items()
    ]
    modules = dict(model.named_modules())
    items += [(f"{n}.{k}", t) for n in info(model).train_modules for k, t in modules[n].state_dict().items()]
    for key, tensor in items:
        ident = tensor_identity(tensor)
        if ident in first_key:
            tied[key] = first_key[ident]
            continue
        first_key[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    return tensors, tied


def tensor_identity(tensor: Tensor) -> tuple[Any, ...]:
    """What makes two tensors one (tied, or shared by layers): the same memory, viewed the same way."""
    if tensor.is_sparse:
        return ("sparse", id(tensor))
    storage = tensor.untyped_storage().data_ptr()
    return storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def check_finite_tensors(tensors: dict[str, Tensor], consequence: str) -> None:
    """Raise :class:`NonFiniteError` naming the floating-point tensors that hold NaN or infinite values."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(
            f"{len(bad)} adapter tensor(s) hold NaN or infinite values ({shown}); {consequence}. Train again "
            "with a lower --lr or check settings such as --alpha"
        )


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path`` in one step."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter.json`` of ``directory``, checked for format and variant."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file() and not dirlock.held(Path(directory)):  # a run that holds it may be mid-swap
        with contextlib.suppress(OSError):  # a kill between the renames of a save left the adapter beside
            finish_swap(Path(directory), lambda d: (d / CONFIG_FILE).is_file())
    if not path.is_file():
        if (Path(directory) / PEFT_CONFIG_FILE).is_file():
            raise AdapterFileError(
                f"{directory} holds a PEFT adapter ({PEFT_CONFIG_FILE}), not a lorakit one; load it with "
                "lorakit.load_peft(model, directory)"
            )
        raise AdapterFileError(
            f"{directory} is not a lorakit adapter directory (no {CONFIG_FILE}); pass the "
            "directory that lorakit.save or `lorakit train` wrote"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise AdapterFileError(
            f"cannot read {path}: it is not UTF-8 text (byte {err.start}); re-save the adapter"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"cannot read {path}: {err}; re-save the adapter") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterFileError(f"{path} is not a lorakit adapter file (format={found!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AdapterFileError(
            f"{path}: format_version {version!r} is not a version number; re-save the adapter"
        )
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} was saved in format version {version} by lorakit {meta.get('lorakit_version', '?')}; "
            f"this lorakit reads up to version {FORMAT_VERSION}: upgrade lorakit to load it"
        )
    fields = {"variant": str, "config": dict, "fingerprint": str, "targets": list, "train_modules": list}
    for name, kind in {**fields, "tied": dict}.items():
        if not isinstance(meta.get(name, {} if name == "tied" else None), kind):
            raise AdapterFileError(
                f"{path}: field '{name}' is missing or not a {kind.__name__}; re-save the adapter"
            )
    try:
        get_variant(meta["variant"])
    except LorakitError as err:
        raise AdapterFileError(f"{path}: {err}") from None
    return meta


@takes_compiled
def load(
    model: nn.Module, directory: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> nn.Module:
    """Apply the adapter saved in ``directory`` to the base ``model`` and fill its tensors; returns ``model``.

    Refuses a base whose targeted weights differ from those the adapter was trained on, a weights file that
    changed since it was saved, and tensors holding NaN or infinite values; on any failure the model is left
    as it was.
    """
    meta = read_meta(directory)
    config_cls = get_variant(meta["variant"]).config_class
    try:
        apply_saved(model, config_cls.from_dict(meta["config"], meta["variant"]))
    except LorakitError as err:  # settings or targets in the file that do not fit: the same error, naming it
        raise type(err)(f"{Path(directory) / CONFIG_FILE}: {err}") from None
    state = info(model)
    if state.targets != meta["targets"]:
        check_same_targets(meta["targets"], model, Path(directory))
    if state.fingerprint != meta["fingerprint"]:
        check_same_base(meta, state.base_sample, model, directory)
    modules = dict(model.named_modules())
    before = {n: {k: v.clone() for k, v in modules[n].state_dict().items()} for n in state.train_modules}
    try:
        fill_tensors(model, load_tensors(directory, device=device))
        if meta.get("chosen_rank") is not None:
            try:
                ranks.set_rank(model, meta["chosen_rank"])
            except LorakitError as err:
                raise AdapterFileError(f"{Path(directory) / CONFIG_FILE}: chosen_rank: {err}") from None
    except Exception as err:
        for name, saved in before.items():  # a fully trained module (a head) may have been filled already
            modules[name].load_state_dict(saved)
        undo_apply(model)
        if isinstance(err, LorakitError):
            raise
        raise AdapterFileError(
            f"the adapter tensors in {directory} do not fit the model ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}); re-save the adapter from the model it was trained with"
        ) from None
    return model


def load_tensors(
    directory: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> dict[str, Tensor]:
    """The adapter tensors saved in ``directory``, with tied keys pointing at their one stored tensor.

    Refuses a weights file whose SHA-256 differs from the one ``adapter.json`` recorded (changed or damaged
    bytes) and tensors holding NaN or infinite values.
    """
    meta = read_meta(directory)
    path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    except Exception as err:  # safetensors raises its own error types
        raise AdapterFileError(f"cannot read {path}: {err}; re-save the adapter") from None
    expected = meta.get("weights_sha256")  # absent in adapters saved before it was recorded
    if expected is not None and file_sha256(path) != expected:
        raise AdapterFileError(
            f"{path} does not match the checksum in {CONFIG_FILE}: it was changed or damaged after it was "
            "saved; re-save the adapter (or train it again)"
        )
    check_finite_tensors(tensors, f"{path} cannot be used; re-save the adapter from a healthy model")
    for alias, key in meta.get("tied", {}).items():
        tensors[alias] = tensors[key]
    return tensors


def fill_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy saved adapter (and fully trained module) tensors into the adapted ``model``.

    Every saved tensor must belong to an adapted layer or a fully trained module: a file holding others was
    written for another model or variant, and loading only part of it would run something else silently.
    """
    used: set[str] = set()
    for name, layer in adapted_layers(model):
        layer.variant.load_adapter_state(_under(tensors, name))
        used |= {f"{name}.{k}" for k in layer.variant.adapter_state()}
    modules = dict(model.named_modules())
    for name in info(model).train_modules:
        own = _under(tensors, name)
        modules[name].load_state_dict(own)  # strict: a key the module lacks is refused by name
        used |= {f"{name}.{k}" for k in own}
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise AdapterFileError(
            f"the adapter file holds tensors this model's adapter has no place for ({', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}): it was saved from another model or variant"
        )


def _under(tensors: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The tensors saved under module ``name``, by their key within it."""
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def undo_apply(model: nn.Module) -> None:
    """Put the base layers back and forget the adapter (the model as it was before :func:`apply`)."""
    for name, layer in adapted_layers(model):
        set_module(model, name, layer.base_layer)
    release(model)
