"""An exponential moving average of a model's weights (``TrainConfig.ema_decay``).

After every optimizer step ``average <- decay * average + (1 - decay) * weights``, starting from the
weights the run starts with; after ``k`` steps from ``w_0`` that is
``decay**k * w_0 + sum_i (1 - decay) * decay**(k - i) * w_i``. The average follows the trainable
parameters only: frozen weights and buffers (e.g. BatchNorm statistics) are the live model's,
as in ``torch.optim.swa_utils.AveragedModel``. Pick a decay whose horizon ``1 / (1 - decay)`` is
well below the run's steps, or the average still remembers the random start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vitrina.errors import UserError

PREFIX = "ema/"  # the average's tensors in the train state


class WeightAverage:
    """The moving average of ``model``'s trainable parameters, kept beside the model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in: ``average += (1 - decay) * (weights - average)``."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The average as ``{PREFIX + name: tensor}`` (for the train state)."""
        return {PREFIX + n: a for n, a in zip(self.names, self.average, strict=True)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], *, where: str) -> None:
        """Restore what ``state_tensors`` gave; ``where`` names the file in the error."""
        saved = {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)}
        if set(saved) != set(self.names):
            raise UserError(f"{where} holds no weight average of this model's parameters; use a new output folder")
        with torch.no_grad():
            for name, average in zip(self.names, self.average, strict=True):
                average.copy_(saved[name])

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
