"""Data-parallel training (torchrun, DDP) computes what one process with the global batch computes.

Ranks are spawned with ``torch.multiprocessing`` and the environment torchrun would give them
(``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free localhost port), so the code
under test takes the same path as ``torchrun --nproc-per-node 2 -m vitrina.cli train clip``.

What is equal, and what is not: the data order, the global batches, the loss, the gradients (after
DDP's all-reduce), the optimizer, the schedule and the checkpoint position are those of one process
with the same global batch, so with deterministic steps the parameters agree to float summation
order. Random augmentation draws are not: each rank draws for its own share of the batch from its
own stream. The comparisons below therefore turn augmentation off (``ClipTrainSettings(augment=False)``)
and use models without dropout.

Tolerances: losses and gradients differ by float rounding (~4e-8 at the first step). AdamW divides
each gradient by its running RMS, so a rounding difference d in a gradient near ``eps`` (1e-6)
moves a weight by up to about lr * d / eps: at lr 1e-3 the weights after 3 steps agree to ~4e-6
(measured; at lr 3e-3, ~1.1e-5), so these runs use lr 1e-3 and hold everything to 1e-5.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_classify import make_folder
from test_losses import naive_clip_loss
from test_train_clip import shape_pairs
from torch.optim.optimizer import register_optimizer_step_pre_hook

from vitrina.cli import main
from vitrina.config import TrainConfig
from vitrina.errors import UserError
from vitrina.losses import clip_loss, clip_loss_rows
from vitrina.models.registry import build_model
from vitrina.train import clip as clip_trainer
from vitrina.train import distributed
from vitrina.train.schedule import EpochOrder

PAIRS = 104  # 8 held out for validation, 96 for training: 3 global batches of 32
GLOBAL_BATCH = 32
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job, args: tuple) -> None:
    """What torchrun does for a worker: the environment, then the job."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback, whatever the host name resolves to
    job(rank, *args)
    distributed.finish()  # what a run that succeeded does before its process exits


def spawn(job, world: int, *args) -> None:
    """Run ``job(rank, *args)`` in ``world`` fresh processes that form one gloo group."""
    mp.spawn(_rank_main, args=(world, free_port(), job, args), nprocs=world)


def config(**changes) -> TrainConfig:
    base = dict(epochs=1, batch_size=GLOBAL_BATCH, lr=1e-3, warmup_steps=1, log_every=1, seed=0, val_fraction=0.077)
    return TrainConfig(**{**base, **changes})


class GradRecorder:
    """Every optimizer step's gradients (after DDP's all-reduce), through the global step pre-hook."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []
        self.handle = register_optimizer_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.steps.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])

    def save(self, path: Path) -> None:
        self.handle.remove()
        save_file({f"{s}/{i}": g for s, grads in enumerate(self.steps) for i, g in enumerate(grads)}, str(path))


def train_tiny_clip(out_dir: Path, train_config: TrainConfig):
    """clip-tiny on the shape pairs, augmentation off (see the module docstring)."""
    torch.manual_seed(0)
    model = build_model("clip-tiny")
    pairs = shape_pairs(PAIRS)
    settings = clip_trainer.ClipTrainSettings(augment=False)
    return clip_trainer.train_clip(
        model=model, pairs=pairs, out_dir=out_dir, train_config=train_config, settings=settings, progress=False
    )


def summary_json(summary) -> dict:
    return {"steps": summary.steps, "epochs_done": summary.epochs_done, "metrics": summary.metrics}


def losses(out_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def parameters(out_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(out_dir / "train_state.safetensors")).items() if k.startswith("model/")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((float((a[k] - b[k]).abs().max()), k) for k in a)
    assert worst[0] <= TOLERANCE, f"largest difference {worst[0]:.3g} in {worst[1]}"


# --- jobs run in the spawned ranks (module level: spawn imports them by name) -----------------


def job_train(rank: int, root: Path) -> None:
    """Both ranks train 3 steps; rank 1 is given a folder of its own, which must stay unwritten."""
    recorder = GradRecorder()
    summary = train_tiny_clip(root / f"out-rank{rank}", config())
    recorder.save(root / f"grads-rank{rank}.safetensors")
    (root / f"summary-rank{rank}.json").write_text(json.dumps(summary_json(summary)))


def job_cut_after_one_step(rank: int, out_dir: Path) -> None:
    train_tiny_clip(out_dir, config(max_minutes=1e-9))


def job_resume(rank: int, out_dir: Path, root: Path) -> None:
    """Refusals first (each raised on both ranks), then the resume itself."""
    errors = []
    for bad in (
        lambda: train_tiny_clip(out_dir, config(batch_size=31)),
        # rank 1 looking at an empty folder: it cannot resume what rank 0 resumes
        lambda: train_tiny_clip(out_dir if rank == 0 else root / "elsewhere", config()),
    ):
        try:
            bad()
        except UserError as error:
            errors.append(str(error))
    summary = train_tiny_clip(out_dir, config())
    (root / f"resume-rank{rank}.json").write_text(json.dumps({"errors": errors, **summary_json(summary)}))


def job_cli(rank: int, argv_of_rank: list[list[str]], root: Path) -> None:
    """The command line, as ``torchrun -m vitrina.cli ...`` runs it in each process."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(argv_of_rank[rank])
    (root / f"printed-rank{rank}").write_text(printed.getvalue())
    still_in_group = torch.distributed.is_initialized()  # main leaves the group once every rank is done
    (root / f"rc-rank{rank}").write_text(f"{rc} {'in group' if still_in_group else 'left'}")


def job_loss(rank: int, root: Path) -> None:
    """Each rank's gathered loss of its half of one batch, and the gradient of its rows."""
    distributed.setup()
    data = load_file(str(root / "batch.safetensors"))
    half = data["image"].shape[0] // 2
    rows = slice(rank * half, (rank + 1) * half)
    image = data["image"][rows].clone().requires_grad_()
    text = data["text"][rows].clone().requires_grad_()
    loss = clip_loss(image, text, data["scale"], gather=distributed.gather_with_grad)
    loss.backward()
    save_file({"loss": loss.detach().view(1), "image": image.grad, "text": text.grad}, str(root / f"loss{rank}.st"))


# --- the loss -------------------------------------------------------------------------------


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_gathered_loss_of_one_process_is_clip_loss(batch: int, scale: float):
    image, text = unit_rows(batch, 8, batch), unit_rows(batch, 8, batch + 100)
    s = torch.tensor(scale, dtype=torch.float64)
    gathered = clip_loss(image, text, s, gather=distributed.gather_with_grad)  # no group: world size 1
    assert gathered.item() == pytest.approx(naive_clip_loss(image, text, scale), rel=1e-9, abs=1e-9)
    assert gathered.item() == pytest.approx(clip_loss(image, text, s).item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shares", [2, 3, 4])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
def test_mean_of_the_shares_rows_is_the_global_loss(shares: int, scale: float):
    image, text = unit_rows(12, 8, shares), unit_rows(12, 8, shares + 100)
    s = torch.tensor(scale, dtype=torch.float64)
    b = 12 // shares
    parts = [
        clip_loss_rows(image[r * b : (r + 1) * b], text[r * b : (r + 1) * b], image, text, s, offset=r * b)
        for r in range(shares)
    ]
    assert (sum(parts) / shares).item() == pytest.approx(naive_clip_loss(image, text, scale), rel=1e-9, abs=1e-9)


def test_two_ranks_gathered_loss_and_gradients_equal_one_batch(tmp_path: Path):
    image, text = unit_rows(8, 6, 1).float(), unit_rows(8, 6, 2).float()
    scale = torch.tensor(1 / 0.07)
    save_file({"image": image, "text": text, "scale": scale}, str(tmp_path / "batch.safetensors"))
    spawn(job_loss, 2, tmp_path)
    ranks = [load_file(str(tmp_path / f"loss{r}.st")) for r in range(2)]
    full_image, full_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    full = clip_loss(full_image, full_text, scale)
    full.backward()
    # DDP averages over the ranks: the objective is the mean of the ranks' losses
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(full.item(), abs=1e-6)
    assert full.item() == pytest.approx(naive_clip_loss(image.double(), text.double(), 1 / 0.07), abs=1e-5)
    got_image = torch.cat([r["image"] for r in ranks]) / 2
    got_text = torch.cat([r["text"] for r in ranks]) / 2
    assert torch.allclose(got_image, full_image.grad, atol=1e-7)
    assert torch.allclose(got_text, full_text.grad, atol=1e-7)


# --- the data shard -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch", "world", "skip_batches"), [(40, 8, 2, 0), (43, 12, 3, 1), (64, 16, 4, 2)])
def test_sharded_order_gives_each_item_to_exactly_one_rank(n: int, batch: int, world: int, skip_batches: int):
    for epoch in (0, 1):
        whole = list(EpochOrder(n, seed=3, epoch=epoch, skip=skip_batches * batch))
        shards = [
            list(
                distributed.ShardedOrder(
                    EpochOrder(n, seed=3, epoch=epoch, skip=skip_batches * batch),
                    batch_size=batch,
                    rank=r,
                    world_size=world,
                )
            )
            for r in range(world)
        ]
        used = len(whole) // batch * batch  # a partial global batch is dropped, as one process drops it
        assert sorted(i for shard in shards for i in shard) == sorted(whole[:used])
        assert all(len(shard) == used // world for shard in shards)
        # the ranks' blocks side by side are one process's batches, in its order
        local = batch // world
        for k in range(used // batch):
            side_by_side = [i for shard in shards for i in shard[k * local : (k + 1) * local]]
            assert side_by_side == whole[k * batch : (k + 1) * batch]
    with pytest.raises(ValueError, match="does not split"):
        distributed.ShardedOrder(range(10), batch_size=10, rank=0, world_size=3)


def test_new_epoch_new_order():
    a = list(distributed.ShardedOrder(EpochOrder(32, seed=0, epoch=0), batch_size=8, rank=1, world_size=2))
    b = list(distributed.ShardedOrder(EpochOrder(32, seed=0, epoch=1), batch_size=8, rank=1, world_size=2))
    assert a != b and len(a) == len(b) == 16


# --- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, global batch 32, 3 steps."""
    root = tmp_path_factory.mktemp("one")
    recorder = GradRecorder()
    summary = train_tiny_clip(root / "out", config())
    recorder.save(root / "grads.safetensors")
    return root, summary


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Two ranks x 16, the same global batch of 32, 3 steps."""
    root = tmp_path_factory.mktemp("two")
    spawn(job_train, 2, root)
    return root


def test_two_processes_give_the_losses_of_one(one_process, two_processes):
    root, summary = one_process
    want, got = losses(root / "out"), losses(two_processes / "out-rank0")
    assert len(want) == len(got) == 3 and summary.steps == 3
    assert got == pytest.approx(want, abs=TOLERANCE)
    assert want[-1] < want[0]  # it learns: real optimisation steps


def test_two_processes_give_the_gradients_of_one(one_process, two_processes):
    root, _ = one_process
    want = load_file(str(root / "grads.safetensors"))
    rank0 = load_file(str(two_processes / "grads-rank0.safetensors"))
    rank1 = load_file(str(two_processes / "grads-rank1.safetensors"))
    assert len(want) > 3 and {k.split("/")[0] for k in want} == {"0", "1", "2"}
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # one all-reduced gradient
    assert_same_tensors(rank0, want)
    assert max(float(g.abs().max()) for g in want.values()) > 1e-3  # gradients that move something


def test_two_processes_reach_the_parameters_of_one(one_process, two_processes):
    root, _ = one_process
    assert_same_tensors(parameters(two_processes / "out-rank0"), parameters(root / "out"))


def test_only_rank_zero_writes(two_processes):
    assert not (two_processes / "out-rank1").exists()
    out = two_processes / "out-rank0"
    assert (out / "model.safetensors").exists() and (out / "metrics.jsonl").exists()
    state = json.loads((out / "train_state.json").read_text())
    assert state["global_step"] == 3 and state["world_size"] == 2 and state["epoch_samples"] == 0


def test_every_rank_returns_rank_zeros_summary(one_process, two_processes):
    _, summary = one_process
    rank0, rank1 = (json.loads((two_processes / f"summary-rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1 and "val/t2i_r1" in rank0["metrics"]
    for key, value in summary.metrics.items():
        assert rank0["metrics"][key] == pytest.approx(value, abs=1e-4), key


def test_started_with_two_resumed_with_one_matches_one_process(one_process, tmp_path: Path):
    root, _ = one_process
    out = tmp_path / "out"
    spawn(job_cut_after_one_step, 2, out)
    state = json.loads((out / "train_state.json").read_text())
    assert (state["global_step"], state["epoch_samples"], state["world_size"]) == (1, GLOBAL_BATCH, 2)
    summary = train_tiny_clip(out, config())
    assert summary.resumed_from_step == 1 and summary.steps == 3
    assert_same_tensors(parameters(out), parameters(root / "out"))
    assert losses(out) == pytest.approx(losses(root / "out"), abs=TOLERANCE)


def test_started_with_one_resumed_with_two_matches_one_process(one_process, tmp_path: Path):
    root, _ = one_process
    out = tmp_path / "out"
    first = train_tiny_clip(out, config(max_minutes=1e-9))
    assert first.stopped_early and first.steps == 1
    spawn(job_resume, 2, out, tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"resume-rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1 and rank0["steps"] == 3
    assert_same_tensors(parameters(out), parameters(root / "out"))
    # the refusals: one line each, the same on both ranks, nothing written
    batch_error, folder_error = rank0["errors"]
    assert "batch of 31 does not split over 2 processes" in batch_error and "\n" not in batch_error
    assert "different checkpoints" in folder_error and "shared output folder" in folder_error
    assert not (tmp_path / "elsewhere").exists()


def test_not_launched_means_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.setup() and distributed.world_size() == 1 and distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: the one-process path
    assert not distributed.launched() and not distributed.setup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="start the run with torchrun"):
        distributed.setup()
    assert not torch.distributed.is_initialized()


def test_train_classify_on_two_processes_gives_the_one_process_results(tmp_path: Path):
    folder = make_folder(tmp_path / "shapes")
    args = ["train", "classify", "--model", "vit-fmnist-28-fast", "--data", str(folder), "--epochs", "2"]
    args += ["--batch-size", "8", "--lr", "1e-3", "--no-augment", "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    spawn(job_cli, 2, [[*args, "--out", str(tmp_path / f"two-rank{r}")] for r in range(2)], tmp_path)
    assert [(tmp_path / f"rc-rank{r}").read_text() for r in range(2)] == ["0 left", "0 left"]
    # one summary, from rank 0: rank 1 would only repeat it
    assert "test accuracy" in (tmp_path / "printed-rank0").read_text()
    assert (tmp_path / "printed-rank1").read_text() == ""
    assert not (tmp_path / "two-rank1").exists()  # rank 1 neither trains into, nor tests into, its folder
    want = json.loads((tmp_path / "one" / "results.json").read_text())
    got = json.loads((tmp_path / "two-rank0" / "results.json").read_text())
    assert (got["test_acc"], got["confusion"], got["best_epoch"]) == (
        want["test_acc"],
        want["confusion"],
        want["best_epoch"],
    )
    assert got["test_loss"] == pytest.approx(want["test_loss"], abs=TOLERANCE)
    assert_same_tensors(parameters(tmp_path / "two-rank0"), parameters(tmp_path / "one"))
