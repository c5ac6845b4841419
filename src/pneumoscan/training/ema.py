"""An exponential moving average of a model's weights (``ema_decay``), on
:class:`torch.optim.swa_utils.AveragedModel`.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the
average follows the first steps of a short run instead of staying near the random
initialisation. Parameters and floating-point buffers (BatchNorm running statistics) are
averaged; integer buffers are copied.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class ModelEma:
    """The averaged copy of a model, updated after every optimizer step.

    Args:
        model: the (unwrapped) model being trained.
        decay: the decay once warmed up, in (0, 1).

    Attributes:
        module: the averaged model (evaluate and checkpoint this one).
        steps: updates so far.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.steps = 0
        self._avg = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self._avg.module

    def current_decay(self) -> float:
        """The decay of the next update (warmed up)."""
        return min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))

    def _average(self, ema: list[torch.Tensor], cur: list[torch.Tensor], _n: Any) -> None:
        if ema and torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, cur, 1.0 - self.current_decay())
        else:
            for a, b in zip(ema, cur):
                a.copy_(b)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average.

        Args:
            model: the trained model (a DDP wrapper is looked through).
        """
        self._avg.update_parameters(getattr(model, "module", model))
        self.steps += 1

    def state(self) -> dict[str, Any]:
        """The averaged weights (CPU tensors) and the update count, for a checkpoint."""
        return {"state_dict": {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}, "steps": self.steps}

    def load(self, state_dict: dict[str, torch.Tensor], steps: int) -> None:
        """Restore the average from a checkpoint.

        Args:
            state_dict: the averaged weights.
            steps: updates they contain.
        """
        self.module.load_state_dict(state_dict)
        self.steps = int(steps)
        self._avg.n_averaged.fill_(self.steps)
