"""Runs that fail or are killed lose nothing: crash-safe checkpoints, non-finite guards, checked resumes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_loop import Batches, Regression, adapted

import lorakit
from lorakit.adapters.io import NonFiniteError
from lorakit.train.checkpoint import DivergedError, ResumeError, has_checkpoint
from lorakit.train.loop import TrainConfig, train

CFG = TrainConfig(steps=10, lr=1e-2, checkpoint_every=2, progress=False)
# Every call that changes the file system while a checkpoint is written (mkdir, renames, rmtree's deletes).
FS_STEPS = ("mkdir", "replace", "rename", "unlink", "remove", "rmdir")


class Crash(BaseException):
    """A kill: not an Exception, so no ``except Exception`` handler can swallow it."""


def crash_at(monkeypatch: pytest.MonkeyPatch, k: int | None) -> list[str]:
    """Make the ``k``-th file-system step and every later one fail (``None``: only count); returns the log."""
    log: list[str] = []
    for name in FS_STEPS:
        real = getattr(os, name)

        def step(*args, _real=real, _name=name, **kwargs):
            log.append(_name)
            if k is not None and len(log) >= k:
                raise Crash(f"killed at step {len(log)} ({_name})")
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, step)
    return log


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_crash_at_any_file_system_step_leaves_a_resume_point_and_resuming_is_bit_identical(
    tmp_path, monkeypatch
) -> None:
    reference = adapted()
    train(reference, Batches(), CFG)
    counted = tmp_path / "counted"
    with monkeypatch.context() as m:
        log = crash_at(m, None)
        train(adapted(), Batches(), CFG, output_dir=counted)
    first_checkpoint = log.index("replace", log.index("replace", log.index("replace") + 1) + 1) + 1

    assert len(log) >= 5 * 8, log  # five checkpoints, each several steps: the loop below covers all of them
    for k in range(1, len(log) + 1):
        out = tmp_path / f"k{k}"
        with monkeypatch.context() as m, pytest.raises(Crash):
            crash_at(m, k)
            train(adapted(), Batches(), CFG, output_dir=out)
        resumed = adapted()
        if k <= first_checkpoint:  # killed before the first checkpoint was complete
            assert not has_checkpoint(out)
            train(resumed, Batches(), CFG, output_dir=out)
        else:
            assert has_checkpoint(out), f"no resume point after a kill at step {k} ({log[k - 1]})"
            result = train(resumed, Batches(), CFG, output_dir=out, resume=True)
            assert result.steps == 10 and len(result.losses) == 10
        for p, q in zip(params(reference), params(resumed), strict=True):
            assert torch.equal(p, q), f"kill at step {k} ({log[k - 1]}) changed the result"


def test_restore_takes_the_newest_complete_copy(tmp_path) -> None:
    out = tmp_path / "run"
    train(adapted(), Batches(), TrainConfig(**{**CFG.__dict__, "steps": 4}), output_dir=out)
    # a kill after the step-4 copy was built and the step-2 copy moved aside, before the final rename
    live = out / "checkpoint"
    shutil.copytree(live, out / ".checkpoint.lorakit-new")
    os.replace(live, out / ".checkpoint.lorakit-old")
    (out / ".checkpoint.lorakit-old" / "trainer.pt").write_bytes(b"")  # and an older, unreadable copy
    model = adapted()
    cfg4 = TrainConfig(**{**CFG.__dict__, "steps": 4})
    result = train(model, Batches(), cfg4, output_dir=out, resume=True)
    assert result.steps == 4 and len(result.losses) == 4  # resumed at step 4: no step was trained again
    reference = adapted()
    train(reference, Batches(), cfg4)
    for p, q in zip(params(reference), params(model), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"hello": 1}, "its 'step' is missing or not a int"),
        ([1, 2], "it holds a list, not lorakit's trainer state"),
        ("edited", "its trainer state does not fit this run"),
    ],
)
def test_a_readable_trainer_state_that_lorakit_did_not_write_is_one_resume_error(tmp_path, state, message):
    """A checkpoint's trainer.pt replaced by another program's file, or edited: refused by name, never a
    KeyError from inside the restore."""
    out = tmp_path / "run"
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 2})
    train(adapted(), Batches(), cfg, output_dir=out)
    trainer = out / "checkpoint" / "trainer.pt"
    if state == "edited":  # the right keys, an optimizer state of another shape
        saved = torch.load(trainer, weights_only=True)
        saved["optimizer"] = {"state": {}, "param_groups": []}
        state = saved
    torch.save(state, trainer)
    with pytest.raises(ResumeError, match=message):
        train(adapted(), Batches(), cfg, output_dir=out, resume=True)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    out = tmp_path / "run"
    train(adapted(), Batches(), TrainConfig(**{**CFG.__dict__, "steps": 4}), output_dir=out)
    good = (out / "checkpoint" / "adapter.safetensors").read_bytes()

    class PoisonedAt7(Batches):
        calls = 0

        def __next__(self):
            self.calls += 1
            batch = super().__next__()
            if self.calls == 7:
                batch["labels"] = batch["labels"] * float("nan")
            return batch

    model = adapted()
    with pytest.raises(NonFiniteError, match=r"training stopped at step 7: the loss is nan") as err:
        cfg = TrainConfig(**{**CFG.__dict__, "checkpoint_every": 4})
        train(model, PoisonedAt7(), cfg, output_dir=out, overwrite=True)
    assert f"last good checkpoint is kept in {out / 'checkpoint'}" in str(err.value)
    assert isinstance(err.value, lorakit.common.errors.LorakitError)  # the CLI's one-line error, exit 2
    assert (out / "checkpoint" / "adapter.safetensors").read_bytes() != good  # step 4 of this run
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was never applied


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_an_infinite_gradient_stops_training_with_or_without_clipping(clip) -> None:
    def overflowing() -> torch.nn.Module:
        # A huge A: the loss stays finite (B starts at zero) but B's gradient overflows float32.
        model = lorakit.apply(Regression(), "lora", rank=2, dropout=0.0)
        with torch.no_grad():
            model.body.variant.A.fill_(1e30)
        return model

    with pytest.raises(NonFiniteError, match="training stopped at step 1: the (loss|gradient norm) is"):
        train(overflowing(), Batches(), TrainConfig(steps=3, clip=clip, progress=False))
    with pytest.raises(NonFiniteError, match="nothing was saved"):
        train(overflowing(), Batches(), TrainConfig(steps=2, clip=clip))


def test_a_diverging_loss_stops_training_at_its_step_and_a_normal_run_is_never_stopped() -> None:
    with pytest.raises(DivergedError, match=r"step 2: the loss is \S+, over 1000 times the first step's"):
        train(adapted(), Batches(), TrainConfig(steps=20, lr=1e6, progress=False))
    result = train(adapted(), Batches(), TrainConfig(steps=60, lr=0.3, progress=False))  # noisy, not diverged
    assert max(result.losses) > result.losses[0] and result.steps == 60


def test_an_adapter_with_non_finite_values_is_never_saved_nor_loaded(tmp_path) -> None:
    model = adapted()
    with torch.no_grad():
        lorakit.adapted_layers(model)[0][1].variant.B[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"1 adapter tensor\(s\) hold NaN or infinite values \(body.B\)"):
        lorakit.save(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # a good adapter whose bytes are overwritten afterwards: the checksum catches any change, NaN or not
    good = adapted()
    lorakit.save(good, tmp_path / "a")
    weights = tmp_path / "a" / "adapter.safetensors"
    tensors = load_file(weights)
    tensors["body.A"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "lorakit-adapter"})
    base = Regression()
    before = params(base)
    with pytest.raises(lorakit.adapters.io.AdapterFileError, match="does not match the checksum"):
        lorakit.load(base, tmp_path / "a")
    assert not lorakit.adapted_layers(base) and all(map(torch.equal, before, params(base)))
    # without a recorded checksum (an adapter saved before it existed) the NaN itself is named
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    del meta["weights_sha256"]
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(NonFiniteError, match=r"\(body.A\)"):
        lorakit.load(base, tmp_path / "a")
    assert not lorakit.adapted_layers(base) and all(map(torch.equal, before, params(base)))


def test_raw_nan_bytes_written_into_the_weights_file_are_refused(tmp_path) -> None:
    lorakit.save(adapted(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"  # the last float32 becomes NaN
    weights.write_bytes(bytes(raw))
    with pytest.raises(lorakit.adapters.io.AdapterFileError, match="changed or damaged"):
        lorakit.load(Regression(), tmp_path / "a")


@pytest.mark.parametrize(
    ("change", "setting", "saved"),
    [
        ({"lr": 2e-2}, "lr", "0.01"),
        ({"batch_size": 16}, "batch_size", "32"),
        ({"seed": 1}, "seed", "0"),
        ({"steps": 12}, "steps", "10"),
        ({"precision": "bf16"}, "precision", "'fp32'"),
    ],
)
def test_resume_refuses_a_changed_training_setting_by_name(tmp_path, change, setting, saved) -> None:
    train(adapted(), Batches(), CFG, output_dir=tmp_path)
    changed = TrainConfig(**{**CFG.__dict__, **change})
    with pytest.raises(ResumeError, match=f"setting {setting} is .* the checkpoint was trained with {saved}"):
        train(adapted(), Batches(), changed, output_dir=tmp_path, resume=True)


def test_resume_refuses_a_changed_adapter_or_data_and_allows_what_does_not_change_numbers(tmp_path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 4})
    train(adapted(), Batches(), cfg, output_dir=tmp_path, settings={"data_fingerprint": "abc"})
    other_rank = lorakit.apply(Regression(), "lora", rank=3, dropout=0.0)
    with pytest.raises(ResumeError, match="setting rank is 3 but the checkpoint was trained with 2"):
        train(
            other_rank, Batches(), cfg, output_dir=tmp_path, resume=True, settings={"data_fingerprint": "abc"}
        )
    with pytest.raises(ResumeError, match="setting data_fingerprint is 'xyz' .* trained with 'abc'"):
        train(
            adapted(), Batches(), cfg, output_dir=tmp_path, resume=True, settings={"data_fingerprint": "xyz"}
        )
    observing = TrainConfig(**{**cfg.__dict__, "eval_every": 1, "checkpoint_every": 3, "progress": True})
    result = train(
        adapted(),
        Batches(),
        observing,
        output_dir=tmp_path,
        resume=True,
        settings={"data_fingerprint": "abc"},
    )
    assert result.steps == 4


def test_infinite_lr_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="invalid training setting lr=inf"):
        TrainConfig(lr=float("inf"))


def test_a_run_never_replaces_an_earlier_runs_checkpoint_unasked(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 4, "checkpoint_every": 2})
    train(adapted(), Batches(), cfg, output_dir=out)
    saved = (out / "checkpoint" / "adapter.safetensors").read_bytes()
    with pytest.raises(lorakit.OutputExistsError, match="pass resume=True to continue it, overwrite=True"):
        train(adapted(), Batches(), cfg, output_dir=out)
    assert (out / "checkpoint" / "adapter.safetensors").read_bytes() == saved  # untouched
    train(adapted(), Batches(), TrainConfig(**{**cfg.__dict__, "steps": 6}), output_dir=out, overwrite=True)
    assert (out / "checkpoint" / "adapter.safetensors").read_bytes() != saved  # replaced when asked
