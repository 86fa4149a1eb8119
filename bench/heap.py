"""What keeping freed memory buys (``vitrina.heap``): the same work in fresh processes, with glibc's heap set as
every vitrina command that runs a model sets it ("kept") and with glibc's own settings (``VITRINA_HEAP=default``).

Each measurement runs in a fresh subprocess, because glibc's thresholds move with what a process has
allocated and freed before (a process that has already freed large blocks behaves like "kept" on its own:
``bench/index_throughput.py``'s harness does, which is why it cannot show this). The two settings alternate,
``--rounds`` (3) rounds, and the median round of each is kept:

* model: one tower's ``encode_image`` on one torch thread, batch 64, random pixels at its input size, 40
  batches after 3 of warm-up: ms per image, and per batch the minor page faults and the kernel's milliseconds
  (``getrusage``);
* index: the CLI, ``vitrina index FOLDER --out FRESH --model M`` with its defaults (2 model replicas for a
  <= 64 px tower on 2 CPUs), over ``--images`` (10,000) Fashion-MNIST files written as
  ``bench/index_throughput.py`` writes them: the img/s it prints (embedding only; the query towers' export
  after it is not in it).

Usage: ``.venv/bin/python bench/heap.py [--models runs/demo/clip clip-minilm clip-small] [--index-model
runs/demo/clip] [--images 10000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import record  # noqa: E402
from bench.index_throughput import make_folder  # noqa: E402
from vitrina.heap import HEAP_VARIABLE  # noqa: E402

SETTINGS = ("kept", "default")

MODEL_LOOP = """
import json, resource, sys, time
import torch
from vitrina.heap import keep_freed_memory
keep_freed_memory()  # as the CLI does before it loads a model; a no-op under VITRINA_HEAP=default
torch.set_num_threads(1)
from vitrina.checkpoint import load_encoder
encoder = load_encoder(sys.argv[1])
size = encoder.image_transform.size
pixels = torch.randn(64, 3, size, size)
with torch.inference_mode():
    for _ in range(3):
        encoder.encode_image(pixels)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(40):
        encoder.encode_image(pixels)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "ms/img": seconds / (40 * 64) * 1000,
    "faults/batch": (after.ru_minflt - before.ru_minflt) / 40,
    "kernel ms/batch": (after.ru_stime - before.ru_stime) / 40 * 1000,
}))
"""


def environment(setting: str) -> dict:
    """This process's environment, with the heap setting of a round (only "default" changes anything)."""
    return {**os.environ, HEAP_VARIABLE: setting}


def model_round(model: str, setting: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MODEL_LOOP, model], env=environment(setting), capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def index_round(model: str, folder: Path, setting: str) -> float:
    with tempfile.TemporaryDirectory(prefix="vitrina-heap-") as out:
        command = [sys.executable, "-m", "vitrina.cli", "index", str(folder), "--out", f"{out}/ix", "--model", model]
        done = subprocess.run(command, env=environment(setting), capture_output=True, text=True, check=True)
    found = re.search(r"embedded in [\d.]+s \(([\d.]+) img/s", done.stdout + done.stderr)
    if found is None:
        raise SystemExit(f"no img/s in the output of {' '.join(command)}:\n{done.stdout[-2000:]}")
    return float(found.group(1))


def median_round(rounds: list[dict], key: str) -> dict:
    """The round whose ``key`` is the median (the other numbers of that same round go with it)."""
    order = sorted(range(len(rounds)), key=lambda i: rounds[i][key])
    return rounds[order[len(rounds) // 2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["runs/demo/clip", "clip-minilm", "clip-small"])
    parser.add_argument("--index-model", default="runs/demo/clip")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "vitrina-bench-fmnist"))
    args = parser.parse_args()

    for model in args.models:
        rounds = {setting: [] for setting in SETTINGS}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                rounds[setting].append(model_round(model, setting))
        kept, default = (median_round(rounds[s], "ms/img") for s in SETTINGS)
        row = {
            "model": model,
            "work": "encode_image, 1 thread, batch 64",
            "kept ms/img": kept["ms/img"],
            "default ms/img": default["ms/img"],
            "speed-up": default["ms/img"] / kept["ms/img"],
            "kept faults/batch": kept["faults/batch"],
            "default faults/batch": default["faults/batch"],
            "kept kernel ms/batch": kept["kernel ms/batch"],
            "default kernel ms/batch": default["kernel ms/batch"],
            "rounds": args.rounds,
        }
        print(row, flush=True)
        record("heap", f"{model} model", row)

    folder = Path(args.folder) / str(args.images)
    make_folder(folder, args.images)
    speeds = {setting: [] for setting in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            speeds[setting].append(index_round(args.index_model, folder, setting))
    kept, default = (statistics.median(speeds[s]) for s in SETTINGS)
    row = {
        "model": args.index_model,
        "work": f"vitrina index, {args.images} files (its default decoders)",
        "kept img/s": kept,
        "default img/s": default,
        "speed-up": kept / default,
        "kept img/s per round": [round(s, 1) for s in speeds["kept"]],
        "default img/s per round": [round(s, 1) for s in speeds["default"]],
        "rounds": args.rounds,
    }
    print(row, flush=True)
    record("heap", f"{args.index_model} index", row)


if __name__ == "__main__":
    main()
