"""keep_freed_memory takes effect: a model's repeated forward passes stop page-faulting their activations in."""

import json
import subprocess
import sys

import pytest

from vitrina.heap import glibc

FAULTS_PER_BATCH = """
import json, resource, sys
import torch
from vitrina.heap import keep_freed_memory
from vitrina.models.registry import build_model

torch.set_num_threads(1)
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
model = build_model("vit-demo-48").eval()
images = torch.randn(32, 3, 48, 48)
with torch.inference_mode():
    for _ in range(3):
        model(images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        model(images)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _faults_per_batch(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_BATCH, mode], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc() is None, reason="not glibc: the heap settings do not apply")
def test_forward_passes_stop_faulting_once_freed_memory_is_kept():
    default, tuned = _faults_per_batch("default"), _faults_per_batch("tuned")
    assert tuned["tuned"] is True
    # glibc's defaults hand each batch's activations back and fault them in again (hundreds to thousands of
    # pages a batch); kept, the same sizes are reused from the heap
    assert tuned["faults"] <= 0.1 * default["faults"] + 20, (default, tuned)
