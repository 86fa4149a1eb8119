"""Time budgets (an LR schedule over wall-clock seconds) and the weight average, on the toy problem
of ``test_train_loop`` with a fake clock that the step function advances."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import NoisyBlobs, read_log, toy_config, toy_eval, toy_model, toy_save, toy_step, weights

from vitrina.errors import UserError
from vitrina.train.checkpointing import STATE_TENSORS
from vitrina.train.loop import StepOutput, train
from vitrina.train.schedule import budget_lr_factor

SECONDS_PER_STEP = 2.0
BUDGET_S = 20.0  # ten steps of the fake clock
LR, MIN_LR_RATIO, WARMUP_FRACTION = 2e-2, 0.1, 0.2


class FakeClock:
    """Seconds that pass only when a step runs (``SECONDS_PER_STEP`` each), from ``start``."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def budget_config(**changes):
    base = dict(
        epochs=5,  # 8 steps an epoch: the budget ends the run in its second epoch
        budget_minutes=BUDGET_S / 60,
        warmup_steps=None,
        warmup_fraction=WARMUP_FRACTION,
        min_lr_ratio=MIN_LR_RATIO,
        lr=LR,
        log_every=1,
    )
    return toy_config(**{**base, **changes})


def run_budget(out_dir: Path, clock: FakeClock, **changes):
    data = NoisyBlobs()

    def step(model, batch) -> StepOutput:
        clock.now += SECONDS_PER_STEP  # the step's work takes its seconds before the loop reads the clock
        return toy_step(model, batch)

    return train(
        model=toy_model(),
        step_fn=step,
        train_data=data,
        out_dir=out_dir,
        config=budget_config(**changes),
        save_fn=toy_save,
        eval_fn=toy_eval(data),
        progress=False,
        clock=clock,
    )


def logged_lrs(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_log(out_dir) if "lr" in r}


def expected_lr(step: int) -> float:
    """The LR of 1-based step ``step``: the fake clock reads ``step * SECONDS_PER_STEP`` when it is applied."""
    factor = budget_lr_factor(
        step * SECONDS_PER_STEP, budget_s=BUDGET_S, warmup_s=WARMUP_FRACTION * BUDGET_S, min_lr_ratio=MIN_LR_RATIO
    )
    return LR * factor


def test_budget_lr_factor_warms_up_then_decays_to_its_floor_at_the_budget():
    kw = dict(budget_s=100.0, warmup_s=10.0, min_lr_ratio=0.1)
    assert budget_lr_factor(5.0, **kw) == pytest.approx(0.5)
    assert budget_lr_factor(10.0, **kw) == pytest.approx(1.0)
    assert budget_lr_factor(55.0, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert budget_lr_factor(100.0, **kw) == pytest.approx(0.1)
    assert budget_lr_factor(250.0, **kw) == pytest.approx(0.1)  # held past the budget


def test_budget_run_follows_the_formula_and_stops_at_the_budget(tmp_path: Path):
    summary = run_budget(tmp_path, FakeClock())
    lrs = logged_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, 11))  # 20 s at 2 s a step, though 5 epochs would be 40 steps
    for step, lr in lrs.items():
        assert lr == pytest.approx(expected_lr(step), rel=1e-12)
    assert lrs[10] == pytest.approx(LR * MIN_LR_RATIO)  # the floor, reached at the budget
    assert max(lrs.values()) == pytest.approx(LR)  # the warm-up's top at 4 s
    assert summary.steps == 10 and summary.budget_spent and not summary.stopped_early
    assert summary.epochs_done == 1  # the run ended inside the second epoch, with a checkpoint
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert state["global_step"] == 10 and state["elapsed_s"] == pytest.approx(BUDGET_S)
    assert "the time budget is spent" in str(summary)

    again = run_budget(tmp_path, FakeClock())  # a complete run: nothing more to do
    assert again.steps == 10 and again.budget_spent


def test_resume_continues_the_budget_clock(tmp_path: Path):
    uninterrupted = tmp_path / "whole"
    run_budget(uninterrupted, FakeClock())
    cut = tmp_path / "cut"
    first = run_budget(cut, FakeClock(), max_minutes=7 / 60)  # stops after the step that passes 7 s
    assert first.stopped_early and first.steps == 4 and not first.budget_spent
    second = run_budget(cut, FakeClock(start=1000.0))  # another origin: only elapsed seconds count
    assert second.resumed_from_step == 4 and second.steps == 10 and second.budget_spent
    assert second.total_minutes * 60 == pytest.approx(BUDGET_S)
    assert logged_lrs(cut) == pytest.approx(logged_lrs(uninterrupted), rel=1e-12)
    for name, tensor in weights(uninterrupted).items():
        torch.testing.assert_close(weights(cut)[name], tensor, rtol=0, atol=0)


def test_budget_settings_that_cannot_work_are_named():
    with pytest.raises(UserError, match="warmup_steps"):
        budget_config(warmup_steps=3).validate()
    with pytest.raises(UserError, match="warmup_seconds"):
        toy_config(warmup_seconds=5.0).validate()  # no budget to warm up within
    with pytest.raises(UserError, match="warmup_seconds"):
        budget_config(warmup_seconds=BUDGET_S).validate()
    with pytest.raises(UserError, match="ema_decay"):
        toy_config(ema_decay=1.0).validate()


# --- the weight average ---------------------------------------------------------------------


def test_ema_equals_the_closed_form_average_and_is_what_is_saved(tmp_path: Path):
    decay, data = 0.8, NoisyBlobs()
    seen: list[dict[str, torch.Tensor]] = []  # the weights each step starts from: w_0 .. w_{k-1}

    def step(model, batch) -> StepOutput:
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return toy_step(model, batch)

    model = toy_model()
    summary = train(
        model=model,
        step_fn=step,
        train_data=data,
        out_dir=tmp_path,
        config=toy_config(epochs=1, ema_decay=decay),
        save_fn=toy_save,
        eval_fn=toy_eval(data),
        progress=False,
    )
    k = summary.steps
    live = {n.removeprefix("model/"): t for n, t in load_file(str(tmp_path / STATE_TENSORS)).items()}
    history = [*seen, {n: live[n] for n in seen[0]}]  # w_0 .. w_k
    saved = weights(tmp_path)
    # update n (0-based) folds w_{n+1} in with d_n = min(decay, (1 + n) / (10 + n)): the warm-up
    decays = [min(decay, (1 + n) / (10 + n)) for n in range(k)]
    assert decays[0] == pytest.approx(0.1) and decays[-1] < decay  # k is short: the warm-up is live
    for name in seen[0]:
        # the closed form: w_0 weighs prod_n d_n; w_i weighs (1 - d_{i-1}) * prod_{n >= i} d_n
        closed_form = math.prod(decays) * history[0][name] + sum(
            (1 - decays[i - 1]) * math.prod(decays[i:]) * history[i][name] for i in range(1, k + 1)
        )
        torch.testing.assert_close(saved[name], closed_form, rtol=1e-5, atol=1e-6)
        assert not torch.equal(saved[name], live[name])  # the live weights are kept apart, for resume
        torch.testing.assert_close(model.state_dict()[name], saved[name])  # the caller holds the average
    evals = [r for r in read_log(tmp_path) if "eval" in r]
    assert evals and all(r["ema"] is True for r in evals)
    # the eval saw the average: its loss is the one of the saved weights
    averaged = toy_model()
    averaged.load_state_dict(saved)
    averaged.eval()
    with torch.no_grad():
        assert evals[-1]["eval"]["val/loss"] == pytest.approx(toy_eval(data)(averaged)["val/loss"], rel=1e-6)


def test_ema_resumes_where_it_stopped(tmp_path: Path):
    from test_train_loop import run_toy

    run_toy(str(tmp_path / "whole"), ema_decay=0.9)
    first = run_toy(str(tmp_path / "cut"), ema_decay=0.9, max_minutes=1e-9)
    assert first.stopped_early
    run_toy(str(tmp_path / "cut"), ema_decay=0.9)
    for name, tensor in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(tmp_path / "cut")[name], tensor, rtol=0, atol=0)
