"""Cold ``vitrina search`` latency: the exported ONNX towers beside the PyTorch path, text and image queries.

What a user waits for after typing ``vitrina search IX "a cat face"``: a fresh Python process that
imports what it needs, loads the query tower, encodes the query, searches and prints the hits. Each
cell is the median wall time of ``--runs`` (5) fresh processes, started one after another from this
script (``subprocess.run`` of the ``vitrina`` console script; one untimed run first, so every timed run
finds the files in the page cache, as a user's second query would).

Models (no weights can be downloaded here, and none are trained: latency does not depend on them):

* ``clip-minilm``: the demo's model shape, the preset saved untrained with ``save_model`` (48 px ViT +
  the packaged all-MiniLM-L6-v2 text tower);
* ``ViT-B-32``: open_clip's own ``ViT-B-32`` built by ``open_clip.create_model`` with random weights, its
  state dict saved to a file and loaded as ``open_clip:ViT-B-32/FILE``, as vitrina loads such a model.

Both index the same ``--images`` generated pictures (``vitrina.index.embed.index_folder``, which also
exports the towers: the export time is reported as ``export s``). Per model and query kind one row:
``onnx s`` (``--runtime onnx``), ``torch s`` (``--runtime torch``), their ratio, the target, whether the
ONNX process imported torch or transformers (checked in one more run that lists its modules at exit),
and whether both paths returned the same hits (ids, scores to 1e-4).

Targets (issue 11): text query <= 1.0 s for the demo model, <= 2.0 s for ViT-B/32.

Usage: ``.venv/bin/python bench/cli_latency.py [--runs 5] [--images 300] [--models clip-minilm,ViT-B-32]``;
``--no-record`` prints the rows without writing ``bench/results/cli_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import record  # noqa: E402

BENCHMARK = "cli_latency"
TEXT_QUERY = "a red circle on a light background"
TARGETS = {"clip-minilm": 1.0, "ViT-B-32": 2.0}  # text queries
MODULES_AT_EXIT = (
    "import sys, json\n"
    "from vitrina.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}),"
    " file=sys.stderr)\n"
)


def make_pictures(folder: Path, n: int) -> Path:
    """``n`` generated 96 px pictures (coloured shapes on shaded backgrounds), PNG and JPEG, in 4 class folders."""
    from PIL import Image, ImageDraw

    if folder.is_dir() and len(list(folder.rglob("*.*"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 210, 40)}
    names = list(colours)
    for i in range(n):
        name = names[i % len(names)]
        (folder / name).mkdir(parents=True, exist_ok=True)
        shade = tuple(int(v) for v in rng.integers(90, 250, 3))
        image = Image.new("RGB", (96, 96), shade)
        pen = ImageDraw.Draw(image)
        lo, hi = int(rng.integers(4, 30)), int(rng.integers(60, 92))
        (pen.ellipse if i % 2 else pen.rectangle)((lo, lo, hi, hi), fill=colours[name])
        image.save(folder / name / f"{i:04d}.{'png' if i % 3 else 'jpg'}", quality=90)
    return folder


def make_model(name: str, work: Path) -> str:
    """A model reference for ``name`` with random weights, saved under ``work``."""
    if name == "clip-minilm":
        from vitrina.checkpoint import save_model
        from vitrina.models.registry import build_model

        folder = work / "clip-minilm"
        if not (folder / "config.json").is_file():
            save_model(build_model("clip-minilm"), folder)
        return str(folder)
    if name == "ViT-B-32":
        import open_clip
        from safetensors.torch import save_file

        path = work / "vit-b-32" / "open_clip_model.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            model = open_clip.create_model("ViT-B-32")  # random weights: none can be downloaded here
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return f"open_clip:ViT-B-32/{path}"
    raise SystemExit(f"unknown model {name!r}: use clip-minilm or ViT-B-32")


def build_index(ref: str, pictures: Path, index_dir: Path) -> tuple[float, float, str]:
    """Index ``pictures`` with ``ref`` (towers exported) -> (index seconds, export seconds, towers summary)."""
    from vitrina.checkpoint import load_encoder
    from vitrina.index.embed import index_folder

    shutil.rmtree(index_dir, ignore_errors=True)
    report = index_folder(pictures, load_encoder(ref), index_dir, model_ref=ref, progress=False)
    return report.seconds, report.towers_seconds, "; ".join(report.towers.values())


def vitrina_command() -> list[str]:
    """The console script beside this interpreter (what a user runs), else ``python -m vitrina.cli``."""
    script = Path(sys.executable).parent / "vitrina"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vitrina.cli"]


def run_search(args: list[str]) -> tuple[float, list]:
    """One fresh ``vitrina search`` process -> (wall seconds, hits as JSON)."""
    start = time.perf_counter()
    done = subprocess.run([*vitrina_command(), "search", *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"vitrina search {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return wall, json.loads(done.stdout)


def modules_at_exit(args: list[str]) -> dict:
    """Whether a ``vitrina search`` process had torch / transformers imported when it finished."""
    done = subprocess.run(
        [sys.executable, "-c", MODULES_AT_EXIT, "search", *args, "--json"], capture_output=True, text=True
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


def same_hits(a: list, b: list) -> bool:
    return [h["id"] for h in a] == [h["id"] for h in b] and all(
        abs(x["score"] - y["score"]) <= 1e-4 for x, y in zip(a, b, strict=True)
    )


def measure(index_dir: Path, query: list[str], runtime: str, runs: int) -> tuple[float, list[float], list]:
    """Median wall seconds of ``runs`` fresh processes (after one untimed run), every time, the hits."""
    args = [str(index_dir), *query, "--runtime", runtime]
    _, hits = run_search(args)  # untimed: the files into the page cache
    times = [run_search(args)[0] for _ in range(runs)]
    return statistics.median(times), times, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per cell (the median is reported)")
    parser.add_argument("--images", type=int, default=300, help="generated pictures to index")
    parser.add_argument("--models", default="clip-minilm,ViT-B-32")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "vitrina-bench-cli-latency"))
    parser.add_argument("--no-record", action="store_true", help="print the rows, write nothing to bench/results")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pictures = make_pictures(work / f"pictures-{args.images}", args.images)
    query_image = sorted(pictures.rglob("*.png"))[0]
    for name in args.models.split(","):
        ref = make_model(name, work)
        index_dir = work / f"index-{name}"
        index_s, export_s, towers = build_index(ref, pictures, index_dir)
        print(f"{name}: indexed {args.images} images in {index_s:.1f} s; towers: {towers}")
        for kind, query in (("text", [TEXT_QUERY]), ("image", ["--image", str(query_image)])):
            onnx_s, onnx_times, onnx_hits = measure(index_dir, query, "onnx", args.runs)
            torch_s, torch_times, torch_hits = measure(index_dir, query, "torch", args.runs)
            loaded = modules_at_exit([str(index_dir), *query, "--runtime", "onnx"])
            row = {
                "model": name,
                "query": kind,
                "images": args.images,
                "runs": args.runs,
                "onnx s": onnx_s,
                "torch s": torch_s,
                "torch / onnx": torch_s / onnx_s,
                "target s": TARGETS.get(name) if kind == "text" else None,
                "onnx imports torch": loaded["torch"],
                "onnx imports transformers": loaded["transformers"],
                "same hits": same_hits(onnx_hits, torch_hits),
                "export s": export_s,
                "onnx runs s": " ".join(f"{t:.2f}" for t in onnx_times),
                "torch runs s": " ".join(f"{t:.2f}" for t in torch_times),
            }
            print(json.dumps(row), flush=True)
            if not args.no_record:
                record(BENCHMARK, f"{name}, {kind} query", row)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
