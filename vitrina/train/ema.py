"""An exponential moving average of a model's weights (``TrainConfig.ema_decay``).

After optimizer step ``n`` (counting from 0) ``average <- d_n * average + (1 - d_n) * weights``
with ``d_n = min(decay, (1 + n) / (10 + n))``, starting from the weights the run starts with. The
warm-up of ``d_n`` (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) matters for short
budgets: with a fixed 0.999 a run of 768 steps still holds ``0.999**768 = 46%`` of the random start
(bench/fmnist_classify.py, hybrid-scratch for 15 minutes: 20.5% test accuracy); with the warm-up
the start's share is ``prod_n d_n``, about 1e-9 after 30 steps. The average follows the trainable parameters
only: frozen weights and buffers (e.g. BatchNorm statistics) are the live model's, as in
``torch.optim.swa_utils.AveragedModel``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vitrina.errors import UserError

PREFIX = "ema/"  # the average's tensors in the train state
UPDATES = PREFIX + "#updates"  # how many steps the average has folded in (drives the warm-up)


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The moving average of ``model``'s trainable parameters, kept beside the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in: ``average += (1 - d_n) * (weights - average)``."""
        decay = warmed_up_decay(self.decay, self.updates)
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The average as ``{PREFIX + name: tensor}`` and its update count (for the train state)."""
        tensors = {PREFIX + n: a for n, a in zip(self.names, self.average, strict=True)}
        tensors[UPDATES] = torch.tensor(self.updates, dtype=torch.int64)
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Restore what ``state_tensors`` gave; ``where`` names the file in the error."""
        saved = {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX) and k != UPDATES}
        if set(saved) != set(self.names) or UPDATES not in tensors:
            raise UserError(f"{where} holds no weight average of this model's parameters; use a new output folder")
        with torch.no_grad():
            for name, average in zip(self.names, self.average, strict=True):
                average.copy_(saved[name])
        self.updates = int(tensors[UPDATES].item())

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model holds the average (to evaluate or save it); the weights after."""
        live = [p.detach().clone() for p in self.params]
        self._copy_into_params(self.average)
        try:
            yield
        finally:
            self._copy_into_params(live)

    def copy_to_model(self) -> None:
        """Make the model the average for good (at the end of a run)."""
        self._copy_into_params(self.average)

    @torch.no_grad()
    def _copy_into_params(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, values, strict=True):
            p.copy_(v)
