"""A full disk at any write of `train`, `merge` and `export`: one line saying "no space left on DIR" and which
resume point survived; nothing saved before is lost, and nothing is left that makes the rerun refuse. Faults
are injected at each write (every file opened for writing, and safetensors' own writer), and, where this
machine lets a test mount one, a small tmpfs really fills up."""

from __future__ import annotations

import builtins
import errno
import io
import shutil
import subprocess
from pathlib import Path

import pytest
import transformers.modeling_utils
from safetensors.torch import load_file
from test_reliability_jobs import argv, leftovers, snapshot

from lorakit.cli import main
from lorakit.train.checkpoint import checkpoint_step, has_checkpoint


class DiskFull:
    """Counts the writes under ``root`` and makes the ``fail_at``-th one (1-based) and every later one fail
    with ENOSPC after writing part of its bytes, as a filling disk does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, fail_at: int | None = None) -> None:
        self.root, self.fail_at, self.writes = str(root), fail_at, []
        real_open, real_safetensors = io.open, transformers.modeling_utils.safe_save_file

        def opening(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax") and str(file).startswith(self.root) and self.failing(file):
                return Filling(handle)
            return handle

        def safetensors_writer(tensors, filename, *args, **kwargs):
            if self.failing(filename):
                Path(filename).write_bytes(b"\0" * 64)  # a partial file, as a full disk leaves it
                raise RuntimeError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            return real_safetensors(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opening)
        monkeypatch.setattr(io, "open", opening)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safetensors_writer)

    def failing(self, file) -> bool:
        name = Path(file).name  # a temporary name of an atomic write (.NAME.random) counts as NAME
        self.writes.append(name[1:].rsplit(".", 1)[0] if name.startswith(".") else name)
        return self.fail_at is not None and len(self.writes) >= self.fail_at


class Filling:
    """A file whose writes stop with ENOSPC after a few bytes."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, data):
        self.handle.write(data[:8])
        raise OSError(errno.ENOSPC, "No space left on device", getattr(self.handle, "name", None))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lorakit:")]
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: no space left on "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def train_writes(tiny_bert_dir: Path, tmp_path: Path, monkeypatch) -> list[str]:
    with monkeypatch.context() as m:
        counter = DiskFull(m, tmp_path)
        assert main(argv(tiny_bert_dir, tmp_path / "counted", "--checkpoint-every", "2")) == 0
    return counter.writes


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, tmp_path_factory) -> dict:
    """The adapter an undisturbed run gives (every resumed run must give it too)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(argv(tiny_bert_dir, out, "--checkpoint-every", "2")) == 0
    return load_file(out / "adapter.safetensors")


def run_out_of_space_at(
    k: int, earlier: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch, capsys, reference
) -> None:
    """Train into a copy of the ``earlier`` run with the disk full from the ``k``-th write on; check the
    message, that the earlier adapter is kept, and that the resume point named gives the reference adapter."""
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    before = snapshot(out)
    capsys.readouterr()
    with monkeypatch.context() as m:
        DiskFull(m, tmp_path, fail_at=k)
        assert main(argv(tiny_bert_dir, out, "--overwrite", "--checkpoint-every", "2")) == 2
    line = error_line(capsys)
    staging = tmp_path / ".run.lorakit-new"
    if "metrics.json was not written" in line:  # after the swap: the new adapter is saved, and says so
        assert "the adapter is saved there" in line and (out / "adapter.json").is_file()
        assert snapshot(out)["adapter.safetensors"] != before["adapter.safetensors"]
        assert leftovers(out) == []
        return
    assert snapshot(out) == before  # the earlier adapter untouched
    step = checkpoint_step(staging)
    if step is None:
        assert "no checkpoint is kept: free space and train again" in line and leftovers(out) == []
        return  # nothing to continue: a new run is a run like any other
    else:
        assert f"the checkpoint of step {step} is kept in {staging}: free space, then --resume" in line
        assert leftovers(out) == [".run.lorakit-new"] and has_checkpoint(staging)
        assert main(argv(tiny_bert_dir, out, "--resume", "--checkpoint-every", "2")) == 0
    resumed = load_file(out / "adapter.safetensors")
    assert all((resumed[key] == value).all() for key, value in reference.items())


@pytest.fixture(scope="module")
def earlier(tiny_bert_dir, tmp_path_factory) -> Path:
    """A finished adapter that the runs below, told to --overwrite it, must keep when they fail."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(argv(tiny_bert_dir, out, "--rank", "3")) == 0
    return out


def test_train_out_of_space_at_a_checkpoint_the_adapter_and_metrics(
    tiny_bert_dir, tmp_path, monkeypatch, capsys, reference, earlier
) -> None:
    writes = train_writes(tiny_bert_dir, tmp_path, monkeypatch)
    assert writes.count("metrics.json") == 1 and writes.count("job.json") == 1, writes
    second_checkpoint = writes.index("trainer.pt", writes.index("trainer.pt") + 1) + 1
    # the first write (no checkpoint yet), the second checkpoint's trainer state (the first is kept),
    # job.json before the adapter (the last checkpoint is kept), metrics.json after the swap
    for k in (1, second_checkpoint, writes.index("job.json") + 1, len(writes)):
        run_out_of_space_at(k, earlier, tiny_bert_dir, tmp_path / f"k{k}", monkeypatch, capsys, reference)


@pytest.mark.slow
def test_train_out_of_space_at_every_write_keeps_a_resume_point_or_says_none_was_kept(
    tiny_bert_dir, tmp_path, monkeypatch, capsys, reference, earlier
) -> None:
    writes = train_writes(tiny_bert_dir, tmp_path, monkeypatch)
    for k in range(1, len(writes) + 1):
        run_out_of_space_at(k, earlier, tiny_bert_dir, tmp_path / f"k{k}", monkeypatch, capsys, reference)


@pytest.fixture(scope="module")
def adapter(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "run"
    assert main(argv(tiny_bert_dir, out)) == 0
    return out


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_out_of_space_at_every_write_leave_nothing_behind(
    adapter, tmp_path, monkeypatch, capsys, command
) -> None:
    def run(out: Path) -> int:
        return main([command, "--adapter", str(adapter), "--out", str(out)])

    with monkeypatch.context() as m:
        counter = DiskFull(m, tmp_path)
        assert run(tmp_path / "counted") == 0
    produced = snapshot(tmp_path / "counted")
    assert len(counter.writes) >= 3, counter.writes
    for k in range(1, len(counter.writes) + 1):
        out = tmp_path / f"k{k}" / "out"
        capsys.readouterr()
        with monkeypatch.context() as m:
            DiskFull(m, tmp_path / f"k{k}", fail_at=k)
            assert run(out) == 2, (k, counter.writes[k - 1])
        line = error_line(capsys)
        assert f"no space left on {out.parent}" in line and f"{out} is as it was" in line
        assert not out.parent.exists()  # no partial output, no lock, no build: not even the parent it made
        assert run(out) == 0  # the rerun is not refused
        assert snapshot(out).keys() == produced.keys()


def test_an_export_out_of_space_keeps_the_adapter_it_would_replace(
    adapter, tmp_path, monkeypatch, capsys
) -> None:
    out = tmp_path / "peft"
    assert main(["export", "--adapter", str(adapter), "--out", str(out)]) == 0
    before = snapshot(out)
    with monkeypatch.context() as m:
        DiskFull(m, tmp_path, fail_at=2)
        assert main(["export", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 2
    assert "no space left on" in error_line(capsys)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_a_small_tmpfs_that_fills_up(adapter, tiny_bert_dir, tmp_path, capsys) -> None:
    """A real full file system: 600 KiB hold a training run but not a merged model (4 MB) nor the
    tokenizer an export carries (700 KB)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert main(argv(tiny_bert_dir, disk / "run", "--checkpoint-every", "2")) == 0
        trained = snapshot(disk / "run")
        for command in ("merge", "export"):
            capsys.readouterr()
            assert main([command, "--adapter", str(adapter), "--out", str(disk / command)]) == 2
            assert f"no space left on {disk}" in error_line(capsys)
            assert sorted(p.name for p in disk.iterdir()) == ["run"]  # the space it took is free again
        assert snapshot(disk / "run") == trained
    finally:
        subprocess.run(["umount", str(disk)], check=True)
