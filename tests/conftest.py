"""Shared test settings: one torch thread in every test.

On a 2-core machine several threads per process spend their time waiting on each other
(measured: a clip-tiny fixture went from 0.9 s to 16 s with 2 threads under load). The setting is
re-applied before each test because code under test (the CLI, the server) may change it."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # module-scoped fixtures run before the per-test one below


@pytest.fixture(autouse=True)
def one_torch_thread():
    torch.set_num_threads(1)
