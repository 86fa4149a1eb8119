"""The shared training loop, on a toy MLP and synthetic data: learning, schedule, clipping, logs,
checkpoints, and resume after a kill (between checkpoints and in the middle of writing one)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from vitrina.config import TrainConfig, from_dict, from_json, load_json, save_json, to_dict, to_json
from vitrina.errors import UserError
from vitrina.train.loop import (
    CheckpointInfo,
    StepOutput,
    find_checkpoint,
    param_groups_for,
    train,
)
from vitrina.train.schedule import lr_factor

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


# --- a toy problem ----------------------------------------------------------------------------


class NoisyBlobs(Dataset):
    """Four Gaussian blobs in 8-d; each read adds fresh noise from torch's RNG (an "augmentation")."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(123)
        self.centres = torch.randn(4, 8, generator=g) * 2
        self.labels = torch.arange(n) % 4
        self.points = self.centres[self.labels] + 0.3 * torch.randn(n, 8, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[i] + 0.1 * torch.randn(8), self.labels[i]


class ToyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.drop = nn.Dropout(0.1)  # consumes the global RNG: resume must restore it
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.norm(self.fc1(x)))))


def toy_model(seed: int = 0) -> ToyMLP:
    torch.manual_seed(seed)
    return ToyMLP()


def toy_step(model: nn.Module, batch) -> StepOutput:
    x, y = batch
    logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    return StepOutput(F.cross_entropy(logits, y), len(y), {"acc": acc})


def toy_save(model: nn.Module, folder: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"kind": "toy"}))


def toy_eval(data: NoisyBlobs):
    def evaluate(model: nn.Module) -> dict[str, float]:
        logits = model(data.points)
        return {"val/loss": F.cross_entropy(logits, data.labels).item()}

    return evaluate


def toy_config(**changes) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=2e-2, warmup_steps=3, log_every=4, seed=7, num_workers=0)
    return TrainConfig(**{**base, **changes})


def run_toy(
    out_dir: str,
    *,
    kill_after_epoch: int | None = None,
    kill_in_save_epoch: int | None = None,
    progress: bool = False,
    **changes,
):
    """Train the toy; optionally SIGKILL ourselves after a checkpoint or halfway through writing one."""
    data = NoisyBlobs()
    model = toy_model()
    saves = {"n": 0}

    def save(model: nn.Module, folder: Path) -> None:
        saves["n"] += 1
        if kill_in_save_epoch is not None and saves["n"] == kill_in_save_epoch:
            (folder / "model.safetensors").write_bytes(b"\0" * 100)  # half a file, then the lights go out
            os.kill(os.getpid(), signal.SIGKILL)
        toy_save(model, folder)

    def on_checkpoint(info: CheckpointInfo) -> None:
        if kill_after_epoch is not None and info.epoch == kill_after_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    return train(
        model=model,
        step_fn=toy_step,
        train_data=data,
        out_dir=out_dir,
        config=toy_config(**changes),
        save_fn=save,
        eval_fn=toy_eval(data),
        best_metric="val/loss",
        on_checkpoint=on_checkpoint,
        progress=progress,
    )


def run_toy_in_subprocess(out_dir: Path, **kwargs) -> int:
    """Run ``run_toy`` in a fresh interpreter (so it can really be SIGKILLed); return its exit code."""
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS_DIR)!r}, {str(REPO)!r}]\n"
        "import torch; torch.set_num_threads(1)\n"
        "import test_train_loop as t\n"
        f"t.run_toy({str(out_dir)!r}, **{kwargs!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stderr)
    return proc.returncode


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "model.safetensors"))


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run that the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run_toy(str(out))
    return out


@pytest.fixture(scope="module")
def reference_with_worker(tmp_path_factory) -> Path:
    """The same, with a data-loading worker process drawing the augmentation noise."""
    out = tmp_path_factory.mktemp("reference_worker")
    run_toy(str(out), num_workers=1)
    return out


# --- learning, schedule, clipping, logs ------------------------------------------------------


def test_loss_decreases_and_summary(reference: Path):
    log = read_log(reference)
    train_lines = [r for r in log if "loss" in r]
    assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
    evals = [r["eval"]["val/loss"] for r in log if "eval" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    state = json.loads((find_checkpoint(reference) / "train_state.json").read_text())
    assert state["epoch"] == 3 and state["global_step"] == 24 and state["batch"] == 0
    assert state["best"]["value"] == min(evals)


def test_summary_of_a_finished_run_resumed(reference: Path, tmp_path: Path):
    # resuming a finished run trains nothing and reports what the checkpoint holds
    before = weights(reference)
    summary = run_toy(str(reference))
    assert (summary.epochs_done, summary.steps, summary.stopped_early) == (3, 24, False)
    assert summary.resumed_from_step == 24
    assert "val/loss" in summary.metrics and "train/loss" in summary.metrics
    assert all(torch.equal(before[k], v) for k, v in weights(reference).items())


def test_bf16_autocast_trains_with_float32_weights_and_gradients(tmp_path: Path):
    seen = {}

    def step(model: nn.Module, batch) -> StepOutput:
        out = toy_step(model, batch)
        seen["forward"] = model(batch[0]).dtype  # what the forward ran in
        return out

    model = toy_model()
    data = NoisyBlobs()
    train(model=model, step_fn=step, train_data=data, out_dir=tmp_path / "bf16", config=toy_config(precision="bf16"),
          save_fn=toy_save, progress=False)  # fmt: skip
    assert seen["forward"] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    log = [r for r in read_log(tmp_path / "bf16") if "loss" in r]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    # fp32 stays out of the run's identity: runs saved before the field existed still resume
    assert "precision" not in toy_config().trajectory() and toy_config(precision="bf16").trajectory()["precision"]
    with pytest.raises(UserError, match="precision"):
        toy_config(precision="fp16").validate()


class TinyImages(Dataset):
    """16 seeded 1 x 8 x 8 images of two classes (bright vs dark), for a hybrid ViT's conv stem."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.y = torch.arange(16) % 2
        self.x = torch.rand(16, 1, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_bf16_stem_runs_only_the_conv_stem_in_bf16_and_evaluates_in_float32(tmp_path: Path):
    from vitrina.models.vit import ViT, ViTConfig

    model = ViT(ViTConfig(image_size=8, patch_size=4, in_channels=1, width=16, depth=1, heads=2, num_classes=2,
                          stem="conv", pool="seq"))  # fmt: skip
    seen: dict[str, set] = {"stem conv": set(), "block": set()}
    model.patch_embed.convs[0].conv.register_forward_hook(lambda m, i, o: seen["stem conv"].add((m.training, o.dtype)))
    model.blocks[0].register_forward_hook(lambda m, i, o: seen["block"].add((m.training, o.dtype)))
    evals = []

    def evaluate(m: nn.Module) -> dict[str, float]:
        evals.append(m.patch_embed.bf16)
        return {"val/loss": float(F.cross_entropy(m(images.x), images.y))}

    images = TinyImages()
    config = toy_config(precision="bf16-stem", epochs=2, val_fraction=0.0)
    train(model=model, step_fn=toy_step, train_data=images, out_dir=tmp_path / "stem", config=config,
          save_fn=toy_save, eval_fn=evaluate, progress=False)  # fmt: skip
    assert seen["stem conv"] == {(True, torch.bfloat16), (False, torch.float32)}  # training steps / evaluations
    assert seen["block"] == {(True, torch.float32), (False, torch.float32)}  # the transformer never in bf16
    assert evals == [False, False] and model.patch_embed.bf16 is False  # switched off outside the steps
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(UserError, match="bf16-stem: the ToyMLP has no convolutional stem"):
        train(model=toy_model(), step_fn=toy_step, train_data=NoisyBlobs(), out_dir=tmp_path / "plain",
              config=toy_config(precision="bf16-stem"), save_fn=toy_save, progress=False)  # fmt: skip
    assert not (tmp_path / "plain").exists()  # refused before anything is written


def test_lr_factor_warmup_then_cosine():
    kw = dict(warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.25)
    assert lr_factor(3, **kw) == pytest.approx(1.0)
    assert lr_factor(4, **kw) == pytest.approx(1.0)  # cosine starts at its top
    # decay spans steps 4..19 (15 steps); at a third of the way cos(pi/3) = 0.5
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_factor(19, **kw) == pytest.approx(0.1)  # the last step reaches the floor
    assert lr_factor(0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


def test_logged_lr_follows_the_schedule(tmp_path: Path):
    data = NoisyBlobs(32)  # 4 steps per epoch, 8 in all
    config = toy_config(epochs=2, log_every=1, min_lr_ratio=0.2)
    train(
        model=toy_model(),
        step_fn=toy_step,
        train_data=data,
        out_dir=tmp_path,
        config=config,
        save_fn=toy_save,
        progress=False,
    )
    lines = [r for r in read_log(tmp_path) if "lr" in r]
    assert [r["step"] for r in lines] == list(range(1, 9))
    for r in lines:
        expected = 2e-2 * lr_factor(r["step"] - 1, warmup_steps=3, total_steps=8, min_lr_ratio=0.2)
        assert r["lr"] == pytest.approx(expected)
        assert r["img_per_s"] > 0 and 0 <= r["acc"] <= 1 and r["grad_norm"] > 0


def test_one_log_line_per_log_step(reference: Path):
    log = read_log(reference)
    assert [r["step"] for r in log if "loss" in r] == [4, 8, 12, 16, 20, 24]
    assert [(r["step"], r["epoch"]) for r in log if "eval" in r] == [(8, 1), (16, 2), (24, 3)]
    for r in log:
        assert r["elapsed_s"] >= 0


def test_gradient_clipping_applies(tmp_path: Path):
    data = NoisyBlobs(8)  # one step
    model = toy_model()
    config = toy_config(epochs=1, grad_clip_norm=1e-3, log_every=1)
    train(
        model=model,
        step_fn=toy_step,
        train_data=data,
        out_dir=tmp_path,
        config=config,
        save_fn=toy_save,
        progress=False,
    )
    # the loop leaves the last step's (clipped) gradients in place
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    (line,) = [r for r in read_log(tmp_path) if "loss" in r]
    assert line["grad_norm"] > 0.01  # the norm before clipping, as logged
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_param_groups_spare_biases_norms_embeddings_and_tokens():
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token_embedding = nn.Embedding(10, 4)
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.logit_scale = nn.Parameter(torch.tensor(2.0))
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    model = Tower()
    groups = param_groups_for(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    spared = sorted(names[id(p)] for p in groups[1]["params"])
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.05, 0.0)
    assert decayed == ["proj.weight"]
    assert spared == sorted(
        ["token_embedding.weight", "pos_embed", "cls_token", "logit_scale", "proj.bias", "norm.weight", "norm.bias"]
    )


# --- checkpoints and resume ------------------------------------------------------------------


def test_checkpoint_layout_is_links_to_one_complete_folder(reference: Path):
    current = find_checkpoint(reference)
    assert current is not None and current.name == "step-00000024"
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["current", "step-00000024"]
    for name in ("model.safetensors", "config.json", "train_state.json", "train_state.safetensors"):
        assert (reference / name).is_symlink() and (reference / name).resolve() == (current / name).resolve()
    state = load_file(str(reference / "train_state.safetensors"))
    assert any(k.startswith("optim/") for k in state) and "model/fc1.weight" in state


def test_resume_after_kill_between_epochs_matches_uninterrupted(reference_with_worker: Path, tmp_path: Path):
    # a worker process draws the augmentation noise: its seeding must be reproduced too
    reference = reference_with_worker
    assert run_toy_in_subprocess(tmp_path, kill_after_epoch=1, num_workers=1) == -signal.SIGKILL
    assert json.loads((tmp_path / "train_state.json").read_text())["epoch"] == 1
    summary = run_toy(str(tmp_path), num_workers=1)
    assert summary.resumed_from_step == 8 and summary.epochs_done == 3
    ref, got = weights(reference), weights(tmp_path)
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6, rtol=0), k  # bitwise in practice
    # the log reads as one run: no step twice
    steps = [r["step"] for r in read_log(tmp_path) if "loss" in r]
    assert steps == [4, 8, 12, 16, 20, 24]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference: Path, tmp_path: Path):
    # the second save (end of epoch 2) dies with a half-written model file
    assert run_toy_in_subprocess(tmp_path, kill_in_save_epoch=2) == -signal.SIGKILL
    assert any(p.name.startswith("tmp-") for p in (tmp_path / "checkpoints").iterdir())
    assert find_checkpoint(tmp_path).name == "step-00000008"
    after_epoch_1 = weights(tmp_path)  # the public file is the complete epoch-1 model
    model = toy_model()
    model.load_state_dict(after_epoch_1)
    summary = run_toy(str(tmp_path))
    assert summary.resumed_from_step == 8
    assert not any(p.name.startswith("tmp-") for p in (tmp_path / "checkpoints").iterdir())
    ref, got = weights(reference), weights(tmp_path)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6, rtol=0) for k in ref)


def test_time_cap_stops_mid_epoch_and_resume_finishes_the_same_run(reference: Path, tmp_path: Path):
    summary = run_toy(str(tmp_path), max_minutes=1e-9)
    assert summary.stopped_early and summary.steps == 1 and summary.epochs_done == 0
    assert "val/loss" in summary.metrics and "time cap" in str(summary)
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert (state["epoch"], state["batch"], state["global_step"]) == (0, 1, 1)
    summary = run_toy(str(tmp_path))  # the cap may change between runs
    assert summary.steps == 24 and not summary.stopped_early
    ref, got = weights(reference), weights(tmp_path)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6, rtol=0) for k in ref)


def test_refuses_to_overwrite(reference: Path, tmp_path: Path):
    with pytest.raises(UserError, match="resume it, choose another output folder"):
        train(
            model=toy_model(),
            step_fn=toy_step,
            train_data=NoisyBlobs(),
            out_dir=reference,
            config=toy_config(),
            save_fn=toy_save,
            resume=False,
            progress=False,
        )
    with pytest.raises(UserError, match=r"other settings \(train.lr: 0.02 -> 0.001"):
        run_toy(str(reference), lr=1e-3)
    with open(reference / ".lock") as held:  # another run is writing there
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another training run is writing to this folder"):
            run_toy(str(reference))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="no training checkpoint"):
        run_toy(str(tmp_path))


def test_user_errors_for_bad_settings_and_tiny_data(tmp_path: Path):
    with pytest.raises(UserError, match="fewer than one batch of 128"):
        run_toy(str(tmp_path), batch_size=128)
    with pytest.raises(UserError, match="epochs=0"):
        run_toy(str(tmp_path), epochs=0)
    with pytest.raises(UserError, match="lr=nan must be positive"):
        run_toy(str(tmp_path), lr=float("nan"))

    def nan_step(model: nn.Module, batch) -> StepOutput:
        out = toy_step(model, batch)
        return StepOutput(out.loss * float("nan"), out.n_items)

    with pytest.raises(UserError, match="diverged: loss is nan at step 1; lower the learning rate"):
        train(
            model=toy_model(),
            step_fn=nan_step,
            train_data=NoisyBlobs(),
            out_dir=tmp_path / "nan",
            config=toy_config(),
            save_fn=toy_save,
            progress=False,
        )


# --- config JSON ----------------------------------------------------------------------------


@dataclass
class _Inner:
    size: int = 3
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class _Outer:
    name: str = "x"
    inner: _Inner = field(default_factory=_Inner)
    maybe: _Inner | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


def test_config_json_round_trip_with_nested_dataclasses(tmp_path: Path):
    obj = _Outer(name="y", inner=_Inner(5, (0.1, 0.2, 0.3)), maybe=_Inner(), train=TrainConfig(max_minutes=2.5))
    assert from_json(_Outer, to_json(obj)) == obj
    save_json(obj, tmp_path / "c.json")
    assert load_json(_Outer, tmp_path / "c.json") == obj
    assert to_dict(obj)["inner"]["mean"] == [0.1, 0.2, 0.3]
    assert from_dict(_Outer, {"name": "z"}) == _Outer(name="z")  # missing fields take defaults
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0


def test_config_json_errors_name_the_field(tmp_path: Path):
    with pytest.raises(UserError, match="unknown field.*learning_rate"):
        from_dict(TrainConfig, {"learning_rate": 0.1})
    with pytest.raises(UserError, match=r"c.json: inner: size: expected int"):
        (tmp_path / "c.json").write_text('{"inner": {"size": "big"}}')
        load_json(_Outer, tmp_path / "c.json")
    with pytest.raises(UserError, match="not valid JSON"):
        from_json(TrainConfig, "{", where="x.json")
    assert math.isfinite(TrainConfig().lr)
