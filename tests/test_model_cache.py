"""The converted-model cache: converted once, checked by hash, rebuilt with one line when partial or corrupt;
a missing extra is one line. The conversion itself is stubbed here (the real one runs in the slow test)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest

from lorakit.jobs import model_cache, models
from lorakit.jobs.model_cache import MANIFEST, ModelCacheError, converted


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """``_convert`` writes three small files and counts its calls; the cache lives in tmp_path."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def convert(name: str, gguf: Path, out: Path) -> None:
        calls.append(out)
        for file in model_cache.REQUIRED:
            (out / file).write_text(f"{file} of {gguf.read_text()}")

    monkeypatch.setattr(model_cache, "_convert", convert)
    gguf = tmp_path / "model.gguf"
    gguf.write_text("weights v1")
    return gguf, calls


def test_converted_once_then_read_from_the_cache(fake_conversion, capsys) -> None:
    gguf, calls = fake_conversion
    first = converted("smollm2", gguf)
    assert len(calls) == 1 and "converting model.gguf once" in capsys.readouterr().err
    manifest = json.loads((first / MANIFEST).read_text())
    assert set(manifest["files"]) == set(model_cache.REQUIRED)
    assert converted("smollm2", gguf) == first and len(calls) == 1
    assert capsys.readouterr().err == ""
    assert first.parent == Path(model_cache.cache_root()) / "models"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_corrupt_or_partial_cache_is_rebuilt_with_one_line(fake_conversion, capsys) -> None:
    gguf, calls = fake_conversion
    target = converted("smollm2", gguf)
    (target / "model.safetensors").write_text("bit rot")
    capsys.readouterr()
    assert converted("smollm2", gguf) == target and len(calls) == 2
    assert "corrupt (model.safetensors does not match" in capsys.readouterr().err
    assert (target / "model.safetensors").read_text() == "model.safetensors of weights v1"
    (target / MANIFEST).unlink()  # a conversion killed before its manifest was written
    assert converted("smollm2", gguf) == target and len(calls) == 3
    assert "incomplete" in capsys.readouterr().err


def test_another_model_file_gets_its_own_directory(fake_conversion) -> None:
    gguf, calls = fake_conversion
    first = converted("smollm2", gguf)
    gguf.write_text("weights v2")
    second = converted("smollm2", gguf)
    assert second != first and len(calls) == 2 and first.is_dir()


def test_a_failed_conversion_leaves_nothing_behind(fake_conversion, monkeypatch) -> None:
    gguf, _ = fake_conversion

    def fail(name: str, gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_cache, "_convert", fail)
    with pytest.raises(ModelCacheError, match="free some space or set LORAKIT_CACHE"):
        converted("smollm2", gguf)
    assert list((model_cache.cache_root() / "models").iterdir()) == []


def test_an_unwritable_cache_and_a_missing_package_are_one_line(
    fake_conversion, monkeypatch, tmp_path
) -> None:
    gguf, _ = fake_conversion
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LORAKIT_CACHE", str(blocker / "cache"))  # a path under a file: not writable
    with pytest.raises(ModelCacheError, match="set LORAKIT_CACHE to a writable directory"):
        converted("smollm2", gguf)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(models.ModelError, match=r"pip install 'lorakit\[smollm2\]'"):
        models.resolve_model("smollm2")
    with pytest.raises(ModelCacheError, match="is missing"):
        converted("smollm2", tmp_path / "gone.gguf")


def test_the_llm_alias_is_a_causal_lm() -> None:
    assert models.infer_task("smollm2") == "causal-lm"
    assert models.infer_task("minilm") == "classification"


def test_processes_converting_at_once_convert_once(fake_conversion, monkeypatch) -> None:
    gguf, calls = fake_conversion
    slow = model_cache._convert

    def convert(name: str, gguf: Path, out: Path) -> None:
        time.sleep(0.5)  # the second caller arrives while the first converts
        slow(name, gguf, out)

    monkeypatch.setattr(model_cache, "_convert", convert)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two opens of the lock file exclude each other
        done = list(pool.map(lambda _: converted("smollm2", gguf), range(2)))
    assert done[0] == done[1] and len(calls) == 1 and (done[0] / MANIFEST).is_file()


def test_a_conversion_missing_a_required_file_is_not_cached(fake_conversion, monkeypatch) -> None:
    """Under a process group transformers saves weights on rank 0 only: a conversion without them is
    refused, never cached as complete."""
    gguf, _ = fake_conversion

    def tokenizer_only(name: str, gguf: Path, out: Path) -> None:
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(model_cache, "_convert", tokenizer_only)
    with pytest.raises(ModelCacheError, match="wrote no config.json, model.safetensors"):
        converted("smollm2", gguf)
    assert list((model_cache.cache_root() / "models").iterdir()) == []


def test_under_a_process_group_the_conversion_runs_in_a_process_of_its_own(fake_conversion, monkeypatch):
    import torch.distributed as dist

    gguf, calls = fake_conversion
    apart: list[Path] = []
    monkeypatch.setattr(model_cache, "_convert_apart", lambda name, g, out: apart.append(out) or calls[:0])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ModelCacheError, match="wrote no"):  # the stub wrote nothing
            converted("smollm2", gguf)
    finally:
        dist.destroy_process_group()
    assert len(apart) == 1 and calls == []  # never in this process, whose saves transformers gates by rank
