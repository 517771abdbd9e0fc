"""AdaLoRA: the paper's formula, the budget schedule, the hook's masking in a real loop, saving only live
triplets, resuming, and parity with PEFT's AdaLoRA (scores, mask and E after masking steps)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from layer_zoo import LAYERS, make_case
from torch import nn
from variant_cases import case_config

import lorakit
from lorakit.variants.adalora import AdaLoRAConfig, AdaLoRAHook, rank_pattern
from lorakit.variants.adalora_budget import budget, global_mask

T, T_INIT, T_FINAL, DELTA_T = 30, 3, 8, 2
CFG = {"init_r": 6, "target_r": 2, "alpha": 12.0, "dropout": 0.0, "t_init": T_INIT, "t_final": T_FINAL}


class Net(nn.Module):
    """Two adapted layers (fc1, fc2) and a plain head; returns an object with ``loss`` like transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        out = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return SimpleNamespace(logits=out, loss=(out - labels).pow(2).mean())


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 16, generator=gen)
    return x, x @ torch.linspace(-1, 1, 64).reshape(16, 4)


def adapted(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    lorakit.apply(model, "adalora", targets=["fc1", "fc2"], **{**CFG, "delta_t": DELTA_T, **overrides})
    return model


def variants(model: nn.Module) -> list:
    return [layer.variant for _, layer in lorakit.adapted_layers(model)]


def run(model, hook, opt, steps, record=None):
    """The documented call order: forward, loss + extra_loss, backward, on_after_backward, step,
    on_after_step, zero_grad. ``record(step)`` sees E after optimizer.step, before the hook masks it."""
    losses = []
    for step in steps:
        x, y = batch(step)
        loss = model(x, y).loss
        (loss + hook.extra_loss(step)).backward()
        hook.on_after_backward(step)
        opt.step()
        if record is not None:
            record(step, "before")
        hook.on_after_step(step)
        if record is not None:
            record(step, "after")
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A full run with a log of live triplets per step; also saves the adapter before and after pruning."""
    model = adapted()
    out = tmp_path_factory.mktemp("adalora")
    lorakit.save(model, out / "before")
    (hook,) = lorakit.make_hooks(model, T)
    opt = torch.optim.AdamW(lorakit.param_groups(model, 1e-2, weight_decay=0.01))
    log: dict = {}

    def record(step: int, when: str) -> None:
        masks = [m.clone() for m in hook.masks]
        nonzero = sum(int((v.E != 0).sum()) for v in variants(model))
        pruned_e = torch.cat([v.E.detach()[~m] for v, m in zip(variants(model), masks, strict=True)])
        log[step, when] = (sum(int(m.sum()) for m in masks), nonzero, pruned_e)

    losses = run(model, hook, opt, range(T), record)
    lorakit.save(model, out / "after")
    return SimpleNamespace(model=model, hook=hook, log=log, losses=losses, dir=out)


def test_budget_sequence_matches_the_spec_example() -> None:
    b = [budget(t, 24, 16, 100, 10, 20) for t in range(130)]
    assert b[:11] == [24] * 11 and b[11] == 23 and b[30] == 18 and b[50:] == [16] * 80
    assert all(b1 >= b2 for b1, b2 in zip(b[:-1], b[1:], strict=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))  # wide enough for init_r 12
    lorakit.apply(model, "adalora", targets=["0", "1"], init_r=12, target_r=8, t_init=10, t_final=20)
    (hook,) = lorakit.make_hooks(model, 100)
    assert (hook.b0, hook.b_target, hook.final_step) == (24, 16, 80)


def test_forward_is_s_P_diag_E_Q_x_and_identity_at_init() -> None:
    model, x = make_case("linear")
    w0, b0 = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    lorakit.apply(model, "adalora", targets=["layer"], init_r=5, target_r=3, alpha=10.0, dropout=0.0)
    v = model.layer.variant
    assert v.scale == 2.0 and v.E.abs().sum() == 0 and v.Q.std().item() == pytest.approx(0.02, rel=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ w0.T + b0)
        v.E.normal_()
        dw = 2.0 * v.P @ torch.diag(v.E) @ v.Q
        torch.testing.assert_close(model(x), x @ (w0 + dw).T + b0, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v.delta_weight(), dw)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"init_r": 4, "target_r": 5}, "target_r"),
        ({"t_init": 5, "t_final": 5, "total_steps": 10}, "total_steps"),
        ({"init_r": 6, "rank": 4}, "rank"),
        ({"delta_t": 0}, "delta_t"),
        ({"beta1": 1.0}, "beta1"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
    ],
)
def test_invalid_fields_name_the_field(fields: dict, name: str) -> None:
    with pytest.raises(lorakit.ConfigError, match=f"'{name}'"):
        AdaLoRAConfig(**fields)


def test_rank_mirrors_init_r_and_run_length_is_checked_by_the_hook() -> None:
    assert AdaLoRAConfig(init_r=6, target_r=4).rank == 6 and AdaLoRAConfig().rank == 12
    model = adapted(t_init=3, t_final=2)
    with pytest.raises(lorakit.ConfigError, match="'total_steps' = 5"):
        lorakit.make_hooks(model, 5)
    assert type(lorakit.make_hooks(model, 6)[0]) is AdaLoRAHook
    assert rank_pattern(model) == {"fc1": 6, "fc2": 6}


def test_global_mask_keeps_exactly_the_budget_even_with_ties() -> None:
    # Five scores tie at 0 and four must go: PEFT's threshold (<= 4th smallest) would prune all five.
    masks = global_mask([torch.zeros(4), torch.tensor([3.0, 0.0, 1.0])], keep=3)
    assert [m.tolist() for m in masks] == [[False] * 4, [True, True, True]]
    masks = global_mask([torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.9, 0.3])], keep=3)
    assert [m.tolist() for m in masks] == [[True, False], [False, True, True]]


def test_live_triplets_equal_the_budget_at_every_masking_step(trained) -> None:
    final = T - T_FINAL
    for step in range(T_INIT + 1, final):
        live, nonzero, _ = trained.log[step, "after"]
        if step % DELTA_T == 0:
            assert live == nonzero == budget(step, 12, 4, T, T_INIT, T_FINAL), step
    assert trained.log[final, "after"][:2] == (4, 4)
    # Between masking steps the optimizer may revive pruned triplets (the paper's reversible pruning) ...
    assert any(
        trained.log[s, "after"][1] > trained.log[s, "after"][0]
        for s in range(T_INIT + 1, final)
        if s % DELTA_T
    )
    # ... but once the mask is final, momentum moves pruned E and the hook puts them back to zero every step.
    assert any(trained.log[s, "before"][2].abs().sum() > 0 for s in range(final + 1, T))
    assert all(trained.log[s, "after"][2].abs().sum() == 0 for s in range(final, T))
    assert sum(rank_pattern(trained.model).values()) == 4
    assert sum(trained.losses[-5:]) < 0.8 * sum(trained.losses[:5])


def test_orthogonality_penalty_matches_a_hand_computation_and_falls(trained) -> None:
    model = adapted(orth_reg_weight=0.3)
    (hook,) = lorakit.make_hooks(model, T)
    with torch.no_grad():
        for v in variants(model):
            v.Q.normal_()
    terms = []
    for v in variants(model):
        eye = torch.eye(6)
        terms += [((v.Q @ v.Q.T - eye) ** 2).sum().sqrt(), ((v.P.T @ v.P - eye) ** 2).sum().sqrt()]
    torch.testing.assert_close(hook.extra_loss(0), 0.3 * sum(terms) / 4)
    opt = torch.optim.Adam([p for v in variants(model) for p in (v.Q, v.P)], lr=0.02)
    start = hook.extra_loss(0).item()
    for _ in range(40):
        opt.zero_grad()
        hook.extra_loss(0).backward()
        opt.step()
    assert hook.extra_loss(0).item() < 0.3 * start
    # Once the mask is final the penalty covers the live triplets only (the pruned ones no longer exist).
    terms = []
    for v in variants(trained.model):
        _, q, p = v.triplets()
        eye = torch.eye(q.shape[0])
        terms += [((q @ q.T - eye) ** 2).sum().sqrt(), ((p.T @ p - eye) ** 2).sum().sqrt()]
    torch.testing.assert_close(trained.hook.extra_loss(T), 0.1 * sum(terms) / 4)
    assert lorakit.make_hooks(adapted(orth_reg_weight=0.0), T)[0].extra_loss(0) is None


def test_saved_adapter_holds_only_live_triplets_and_loads_resized(trained) -> None:
    model, pattern = trained.model, rank_pattern(trained.model)
    for name, v in zip(["fc1", "fc2"], variants(model), strict=True):
        state, r = v.adapter_state(), pattern[name]
        assert (
            state["E"].shape == (r,) and state["Q"].shape == (r, v.Q.shape[1]) and state["P"].shape == (24, r)
        )
        assert r < 6 and torch.all(state["E"] != 0)
    size = {k: (trained.dir / k / "adapter.safetensors").stat().st_size for k in ("before", "after")}
    assert size["after"] < size["before"]
    torch.manual_seed(0)
    fresh = lorakit.load(Net(), trained.dir / "after")
    assert rank_pattern(fresh) == pattern and variants(fresh)[0].E.shape == (pattern["fc1"],)
    x, y = batch(999)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, y).logits, model(x, y).logits)
        for a, b in zip(variants(fresh), variants(model), strict=True):
            torch.testing.assert_close(a.delta_weight(), b.delta_weight(), atol=0, rtol=0)


@pytest.mark.parametrize("stop", [12, 25])  # resume during the budget phase, and after the final mask
def test_resume_from_hook_state_continues_exactly(stop: int) -> None:
    def start():
        model = adapted()
        (hook,) = lorakit.make_hooks(model, T)
        return model, hook, torch.optim.AdamW(lorakit.param_groups(model, 1e-2, weight_decay=0.01))

    model, hook, opt = start()
    run(model, hook, opt, range(stop + 1))
    adapter = {
        n: {k: t.clone() for k, t in v.adapter_state().items()}
        for n, v in zip("ab", variants(model), strict=True)
    }
    saved = copy.deepcopy((opt.state_dict(), hook.state_dict()))
    run(model, hook, opt, range(stop + 1, T))
    # The training loop's order: hooks and optimizer first, then adapter tensors, optimizer, hook state.
    model2, hook2, opt2 = start()
    for n, v in zip("ab", variants(model2), strict=True):
        v.load_adapter_state(adapter[n])
    opt2.load_state_dict(saved[0])
    hook2.load_state_dict(saved[1])
    run(model2, hook2, opt2, range(stop + 1, T))
    for a, b in zip(variants(model2), variants(model), strict=True):
        assert all(torch.equal(t1, t2) for t1, t2 in zip(a.triplets(), b.triplets(), strict=True))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_case_config_masks_and_round_trips_on_every_kind(kind: str, tmp_path) -> None:
    model, x = make_case(kind)
    lorakit.apply(model, "adalora", targets=["layer"], **case_config("adalora"))
    (hook,) = lorakit.make_hooks(model, 8)
    opt = torch.optim.AdamW(lorakit.param_groups(model, 0.05))
    v = model.layer.variant
    for step in range(8):
        (model(x).float().square().mean() + hook.extra_loss(step)).backward()
        opt.step()
        hook.on_after_step(step)
        opt.zero_grad()
        if step == 2:
            assert int(hook.masks[0].sum()) == 4 == int((v.E != 0).sum())
    assert rank_pattern(model) == {"layer": 2} and hook.fixed
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(make_case(kind)[0], tmp_path / "a")
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_peft_parity_scores_mask_and_E_over_masking_steps() -> None:
    from peft import AdaLoraConfig, get_peft_model

    steps, total = 7, 8  # t_init 1, t_final 2: budget 12 -> 8 (step 2) -> 5 (3) -> 4; final mask at step 6
    torch.manual_seed(0)
    ours, theirs = Net(), Net()
    theirs.load_state_dict(ours.state_dict())
    cfg = {**CFG, "t_init": 1, "t_final": 2, "total_steps": total, "orth_reg_weight": 0.1}
    lorakit.apply(ours, "adalora", targets=["fc1", "fc2"], **cfg)
    pcfg = AdaLoraConfig(
        target_modules=["fc1", "fc2"],
        init_r=6,
        target_r=2,
        lora_alpha=12,
        lora_dropout=0.0,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=total,
        orth_reg_weight=0.1,
    )
    peft_model = get_peft_model(theirs, pcfg).base_model  # AdaLoraModel: adds the orthogonality penalty
    layers = [peft_model.model.get_submodule(n) for n in ("fc1", "fc2")]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pl, v in zip(layers, variants(ours), strict=True):
            pl.lora_E["default"].copy_(torch.randn(6, 1, generator=gen) * 0.5)
            for t in (pl.lora_A["default"], pl.lora_B["default"]):
                t.add_(torch.randn(t.shape, generator=gen) * 0.3)
            v.E.copy_(pl.lora_E["default"][:, 0])
            v.Q.copy_(pl.lora_A["default"])
            v.P.copy_(pl.lora_B["default"])
    (hook,) = lorakit.make_hooks(ours, 100)  # total_steps from the config wins over the run length
    close = {"atol": 1e-5, "rtol": 1e-4}
    for step in range(steps + 1):
        x, y = batch(step)
        out_o, out_t = ours(x, y), peft_model(x, labels=y)
        assert (out_o.logits - out_t.logits).abs().max() <= 1e-5
        if step == steps:
            break
        loss_o = out_o.loss + hook.extra_loss(step)
        torch.testing.assert_close(loss_o, out_t.loss, **close)
        loss_o.backward(), out_t.loss.backward()
        for pl, v in zip(layers, variants(ours), strict=True):
            torch.testing.assert_close(v.E.grad, pl.lora_E["default"].grad[:, 0], **close)
            torch.testing.assert_close(v.Q.grad, pl.lora_A["default"].grad, **close)
            torch.testing.assert_close(v.P.grad, pl.lora_B["default"].grad, **close)
        hook.on_after_step(step)
        peft_model.update_and_allocate(step)
        alloc = peft_model.rankallocator
        for i, (name, pl, v) in enumerate(zip(("fc1", "fc2"), layers, variants(ours), strict=True)):
            if step < 6:  # PEFT resets its scores after the final mask; ours are dropped too
                for k, key in enumerate(("lora_E", "lora_A", "lora_B")):
                    pname = f"{name}.{key}.default"
                    ibar, u = alloc.exp_avg_ipt[pname], alloc.exp_avg_unc[pname]
                    torch.testing.assert_close(
                        hook.ema[i][2 * k], ibar.reshape(hook.ema[i][2 * k].shape), **close
                    )
                    torch.testing.assert_close(
                        hook.ema[i][2 * k + 1], u.reshape(hook.ema[i][2 * k].shape), **close
                    )
            if step >= 2:  # PEFT records its mask from the first masking step on
                assert hook.masks[i].tolist() == pcfg.rank_pattern[f"{name}.lora_E.default"], (step, name)
            torch.testing.assert_close(v.E.detach(), pl.lora_E["default"].detach()[:, 0], atol=0, rtol=0)
        for p in list(ours.parameters()) + list(peft_model.parameters()):
            p.grad = None
    assert rank_pattern(ours) == {n: sum(pcfg.rank_pattern[f"{n}.lora_E.default"]) for n in ("fc1", "fc2")}
