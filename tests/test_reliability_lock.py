"""One writer per output directory: a second `train`, `merge`, `export` or `bench` into a directory another
lorakit command is writing is refused at its start, naming that command; a lock left by a killed process is
named and taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability_jobs import argv, leftovers, snapshot

from lorakit.cli import main
from lorakit.common import dirlock

ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_run_into_a_running_jobs_directory_is_refused_and_loses_nothing(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    """Two real processes: a long run holds o/run; a second run, with --overwrite or without, is refused in
    one line naming it, and the first run's checkpoint and the adapter already there stay as they were."""
    out = tmp_path / "run"
    assert main(argv(tiny_bert_dir, out)) == 0  # an earlier finished adapter
    finished = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    long = [sys.executable, "-m", "lorakit.cli", *argv(tiny_bert_dir, out), "--steps", "100000"]
    first = subprocess.Popen([*long, "--overwrite", "--checkpoint-every", "2"], env=env, cwd=tmp_path)
    try:
        staging = tmp_path / ".run.lorakit-new"
        wait_for(lambda: (staging / "checkpoint" / "trainer.pt").is_file())
        capsys.readouterr()
        for extra in ([], ["--overwrite"], ["--resume", "--steps", "100000"]):
            assert main([*argv(tiny_bert_dir, out), *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is being written by another lorakit command" in err, err
            assert f"lorakit train, pid {first.pid} on {socket.gethostname()}" in err
        assert first.poll() is None and (staging / "checkpoint" / "trainer.pt").is_file()  # still training
        assert snapshot(out) == finished
    finally:
        first.send_signal(signal.SIGKILL)  # a kill leaves its lock file behind, no longer locked
        first.wait()
    lock = tmp_path / ".run.lorakit-lock"
    assert json.loads(lock.read_text())["pid"] == first.pid
    assert main(argv(tiny_bert_dir, out, "--overwrite")) == 0  # taken over, the killed run discarded
    err = capsys.readouterr().err
    assert f"taking over the lock of --output-dir {out} left by lorakit train, pid {first.pid}" in err
    assert snapshot(out) != finished and leftovers(out) == []


def test_a_held_lock_refuses_merge_export_bench_and_train_and_is_released_after(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    adapter = tmp_path / "adapter"
    assert main(argv(tiny_bert_dir, adapter)) == 0
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"runs:\n  - {{name: a, model: {tiny_bert_dir}, steps: 2, batch_size: 4}}\n")
    commands = {
        "merge": ["merge", "--adapter", str(adapter), "--out"],
        "export": ["export", "--adapter", str(adapter), "--overwrite", "--out"],
        "bench": ["bench", str(bench), "--out"],
        "train": [*argv(tiny_bert_dir, tmp_path / "unused"), "--overwrite", "--output-dir"],  # the last wins
    }
    capsys.readouterr()
    for name, command in commands.items():
        target = tmp_path / f"out-{name}"
        with dirlock.exclusive(target, str(target), "lorakit test"):  # another open of the lock file
            assert main([*command, str(target)]) == 2, name
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is being written by another lorakit command (lorakit test" in err
            assert not target.exists(), name
        assert not dirlock.held(target) and not dirlock.lock_path(target).exists()
        if name == "bench":  # its run is a training process of its own: the lock is seen released above
            continue
        assert main([*command, str(target)]) == 0, name  # free again
        assert not dirlock.lock_path(target).exists() and target.is_dir()
        capsys.readouterr()


def test_a_directory_reached_through_a_symlink_has_one_writer_and_keeps_the_link(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    """A symlink names the same directory as its target: a command writing through the link is refused while
    another writes the target (and the other way round), and a run through the link replaces the directory
    it points to, keeping the link and leaving nothing beside it."""
    real, link = tmp_path / "real", tmp_path / "link"
    peft, peft_link = tmp_path / "peft", tmp_path / "peft-link"
    assert main(argv(tiny_bert_dir, real)) == 0
    assert main(["export", "--adapter", str(real), "--out", str(peft)]) == 0
    link.symlink_to(real, target_is_directory=True)
    peft_link.symlink_to(peft, target_is_directory=True)
    capsys.readouterr()
    refused = {
        "train": (real, link, argv(tiny_bert_dir, link, "--overwrite")),
        "export": (
            peft,
            peft_link,
            ["export", "--adapter", str(real), "--overwrite", "--out", str(peft_link)],
        ),
    }
    for name, (locked, through, command) in refused.items():
        before = snapshot(locked)
        with dirlock.exclusive(locked, str(locked), "lorakit test"):
            assert main(command) == 2, name
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is being written by another lorakit command (lorakit test" in err
        assert snapshot(locked) == before and through.is_symlink(), name
    finished = snapshot(real)
    with dirlock.exclusive(link, str(link), "lorakit test"):  # the lock taken through the link
        assert main(argv(tiny_bert_dir, real, "--overwrite")) == 2
        assert "is being written by another lorakit command" in capsys.readouterr().err
    assert main(argv(tiny_bert_dir, link, "--overwrite", "--seed", "1")) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert snapshot(real) != finished and (real / "adapter.json").is_file()
    assert leftovers(link) == [] and leftovers(real) == []


def test_the_lock_file_names_its_owner_and_an_unlocked_one_is_stale(tmp_path, capsys) -> None:
    target = tmp_path / "a" / "b" / "out"
    with dirlock.exclusive(target, "out", "lorakit train"):
        owner = json.loads(dirlock.lock_path(target).read_text())
        assert (owner["pid"], owner["host"], owner["command"]) == (
            os.getpid(),
            socket.gethostname(),
            "lorakit train",
        )
        assert dirlock.held(target)
        with pytest.raises(dirlock.DirectoryInUseError, match=f"pid {os.getpid()} on "):
            with dirlock.exclusive(target, "out", "lorakit merge"):
                pass
    assert not (tmp_path / "a").exists()  # the parents it made for the lock, empty again, are gone
    lock = dirlock.lock_path(target)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"command": "lorakit export", "pid": 999999, "host": "gone"}))
    with dirlock.exclusive(target, "out", "lorakit merge"):  # nobody holds it: stale, named, taken over
        pass
    assert "taking over the lock of out left by lorakit export, pid 999999 on gone" in capsys.readouterr().err
    assert not lock.exists()


def test_a_held_lock_refuses_federate_before_any_round(tiny_bert_dir, tmp_path, capsys) -> None:
    target = tmp_path / "fed-out"
    command = ["federate", "--model", str(tiny_bert_dir), "--clients", "2", "--cohort", "1", "--rounds", "1"]
    with dirlock.exclusive(target, str(target), "lorakit test"):
        assert main([*command, "--output-dir", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is being written by another lorakit command (lorakit test" in err
    assert not target.exists() and not dirlock.lock_path(target).exists()
