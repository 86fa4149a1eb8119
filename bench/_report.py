"""Shared plumbing for benchmarks: merge one measured row into bench/results/X.json and
regenerate BENCHMARKS.md from every results file.

Each results file maps a row name to its metrics plus where and when they were measured:
``{row: {metric: value, ..., "command": str, "machine": str, "date": str}}``. Rows are merged
one at a time as they finish, so a session cut off mid-benchmark keeps what it measured.
Numbers in BENCHMARKS.md are only ever written by this module, from those files.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MARKDOWN = BENCH_DIR.parent / "BENCHMARKS.md"
PROVENANCE = ("command", "machine", "date")


def machine_summary() -> str:
    """One line naming the CPU, core count, memory and torch build of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        torch_part = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        torch_part = ""
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB{torch_part}"


def provenance(command: str | None = None) -> dict[str, str]:
    """Where and when a result is measured: the command (default: this process's), the machine, the date."""
    return {
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_summary(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def record(benchmark: str, row: str, metrics: dict, command: str | None = None) -> Path:
    """Merge ``metrics`` as ``row`` of ``bench/results/<benchmark>.json`` and rebuild BENCHMARKS.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{benchmark}.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table[row] = {**metrics, **provenance(command)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    write_markdown()
    return path


def check_recipe(benchmark: str, row: str, recipe: dict) -> None:
    """``SystemExit`` when ``row`` holds seeds of another recipe (call it before a long run, too)."""
    path = RESULTS_DIR / f"{benchmark}.json"
    old = json.loads(path.read_text()).get(row, {}) if path.exists() else {}
    if old.get("per_seed") and old.get("recipe") != recipe:
        saved = old.get("recipe", {})
        differ = sorted(k for k in {*saved, *recipe} if saved.get(k) != recipe.get(k))
        raise SystemExit(
            f"{path}: row {row!r} holds seeds {sorted(old['per_seed'])} of another recipe ({', '.join(differ)} "
            "differ); give this run its own row (--name NEW_ROW), or delete that row"
        )


def record_seed(
    benchmark: str,
    row: str,
    seed: int,
    metrics: dict,
    *,
    recipe: dict,
    listed: tuple[str, ...] = ("test_acc",),
    shown: tuple[str, ...] = (),
    command: str | None = None,
) -> Path:
    """Merge one seed's ``metrics`` into ``row``, whose headline numbers are the mean over its seeds.

    The row holds ``recipe`` (what every seed shares: model, budget, options), ``n_seeds`` and
    ``seeds``, the mean of every numeric metric, ``<key>_per_seed`` lists for the ``listed`` keys, and
    ``per_seed`` ``{seed: metrics + provenance}``; nested values stay in the JSON, out of the markdown table,
    where the ``shown`` recipe fields appear as columns of their own. A seed run
    again replaces its own entry. A row that holds seeds of another recipe is not mixed into: that
    is a ``SystemExit`` naming the settings that differ.
    """
    check_recipe(benchmark, row, recipe)
    path = RESULTS_DIR / f"{benchmark}.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    per_seed = dict(table.get(row, {}).get("per_seed", {}))
    # each seed keeps its own command, machine and date: seeds of one row may run on different machines
    per_seed[str(seed)] = {**metrics, **provenance(command)}
    per_seed = dict(sorted(per_seed.items(), key=lambda item: int(item[0])))
    means = {}
    for key in metrics:
        values = [m.get(key) for m in per_seed.values()]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            # a value every seed shares (parameters, batch size) stays as it is: an int stays an int
            means[key] = values[0] if len(set(values)) == 1 else sum(values) / len(values)
            if key in listed:
                means[f"{key}_per_seed"] = values
    merged = {"n_seeds": len(per_seed), "seeds": [int(s) for s in per_seed], **means}
    merged |= {k: recipe[k] for k in shown} | {"recipe": recipe}
    # the headline metrics and their per-seed values first, then how many seeds they are the mean of
    headline = [name for k in listed for name in (k, f"{k}_per_seed") if name in merged]
    ordered = {k: merged.pop(k) for k in headline} | merged
    return record(benchmark, row, {**ordered, "per_seed": per_seed}, command=command)


def _measured_where(metrics: dict) -> set[tuple]:
    """The (machine, command, day) of a row and of each of its seeds that records its own."""
    runs = [metrics, *(m for m in metrics.get("per_seed", {}).values() if "machine" in m)]
    return {(m.get("machine"), m.get("command"), m.get("date", "")[:10]) for m in runs}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # per-seed values
        return " / ".join(_cell(v) for v in value)
    return str(value)


def write_markdown() -> None:
    """Render every results file as one table in BENCHMARKS.md (intro kept from bench/INTRO.md).

    Under each heading goes ``bench/notes/<benchmark>.md`` when there is one (protocol, targets, what
    the numbers mean: prose, never a number that the table does not hold), then the table, its
    provenance, and every ``bench/results/<benchmark>*.png`` (curves, t-SNE plots...) as an image.
    """
    intro = BENCH_DIR / "INTRO.md"
    parts = [intro.read_text().rstrip() + "\n" if intro.exists() else "# Benchmarks\n"]
    for path in sorted(RESULTS_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        columns: list[str] = []
        for metrics in table.values():  # nested details (a row's per-seed results, its recipe) stay in the JSON
            shown = [k for k, v in metrics.items() if not isinstance(v, dict) and k not in PROVENANCE]
            columns += [k for k in shown if k not in columns]
        parts.append(f"\n## {path.stem}\n")
        notes = BENCH_DIR / "notes" / f"{path.stem}.md"
        if notes.exists():
            parts.append(notes.read_text().rstrip() + "\n")
        parts.append(f"Source: `bench/results/{path.name}`, written by `bench/{path.stem}.py`.\n")
        parts.append("| row | " + " | ".join(columns) + " |")
        parts.append("|---" * (len(columns) + 1) + "|")
        for row, metrics in table.items():
            parts.append(f"| {row} | " + " | ".join(_cell(metrics.get(c, "")) for c in columns) + " |")
        measured = set().union(*(_measured_where(m) for m in table.values()))
        parts.append("")
        for machine, command, day in sorted(measured, key=str):
            parts.append(f"- `{command}` on {machine}, {day}")
        pictures = sorted(RESULTS_DIR.glob(f"{path.stem}*.png"))
        if pictures:
            parts.append("")
            markdown_dir = MARKDOWN.resolve().parent
            for png in pictures:
                link = os.path.relpath(png.resolve(), markdown_dir)
                parts.append(f"![{png.stem}]({link})")
    MARKDOWN.write_text("\n".join(parts) + "\n")
