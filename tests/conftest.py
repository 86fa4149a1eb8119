"""Shared test settings: one torch thread per test process.

On a 2-core machine several threads per process spend their time waiting on each other
(measured: a clip-tiny fixture went from 0.9 s to 16 s with 2 threads under load)."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)
