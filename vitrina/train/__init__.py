"""Training: the one loop (``loop``) and the trainers built on it (``clip``)."""

from vitrina.train.loop import CheckpointInfo, StepOutput, TrainSummary, find_checkpoint, train

__all__ = ["CheckpointInfo", "StepOutput", "TrainSummary", "find_checkpoint", "train"]
