"""Training: the one loop (``loop``, with ``schedule``, ``checkpointing`` and ``ema``) and the
trainers built on it (``clip``, ``classify``, ``transfer``)."""

from vitrina.train.checkpointing import find_checkpoint
from vitrina.train.loop import CheckpointInfo, StepOutput, TrainSummary, train

__all__ = ["CheckpointInfo", "StepOutput", "TrainSummary", "find_checkpoint", "train"]
