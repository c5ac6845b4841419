"""Ensembles: several trained networks answering as one, with the mean of their logits.

An ensemble is an ordinary :class:`~pneumoscan.models.bundle.ModelBundle`, so predict,
evaluate, serve, export and calibrate take it as they take any model:

* ``arch = "ensemble"`` and ``arch_kwargs = {"members": [{"arch": ..., "arch_kwargs": {...}}, ...]}``
  (each member's own architecture and builder arguments);
* ``state_dict``: the members' weights under ``members.<i>.`` (an ``nn.ModuleList``);
* ``preprocessing``: the members share the input side and resize rule (the only preprocessing
  outside a network); each keeps its own normalisation inside its network.

``create_model("ensemble", members=[...])`` (:func:`pneumoscan.models.factory.create_model`)
builds an :class:`EnsembleNet`. Its Grad-CAM is the mean of the members' normalised maps, each
at its member's own target layer (:attr:`EnsembleNet.gradcam_layers`). ``pneumoscan ensemble``
(:mod:`pneumoscan.workflows.ensemble`) makes such bundles from trained runs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ModelError

#: The architecture name of an ensemble bundle.
ENSEMBLE_ARCH = "ensemble"
#: Prefix of the members' modules (and state-dict keys) inside an :class:`EnsembleNet`.
MEMBERS_PREFIX = "members"


class EnsembleNet(nn.Module):
    """Member networks answering with the mean of their logits.

    Args:
        members: the networks, each mapping ``(B, 1, S, S)`` in [0, 1] to ``(B, 1)`` logits.
        gradcam_layers: each member's own Grad-CAM target layer (a name inside that member).

    Attributes:
        gradcam_layers: the target layers as names inside the ensemble (``members.<i>.<layer>``).
    """

    def __init__(self, members: Sequence[nn.Module], gradcam_layers: Sequence[str]) -> None:
        super().__init__()
        if not members or len(members) != len(gradcam_layers):
            raise ModelError("an ensemble needs at least one member and one Grad-CAM layer per member")
        self.members = nn.ModuleList(members)
        self.gradcam_layers = tuple(f"{MEMBERS_PREFIX}.{i}.{layer}" for i, layer in enumerate(gradcam_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def member_specs(members: Any) -> list[tuple[str, dict[str, Any]]]:
    """The ``(arch, arch_kwargs)`` of each member of an ensemble's ``members`` argument.

    Args:
        members: ``[{"arch": name, "arch_kwargs": {...}}, ...]``.

    Raises:
        ModelError: not such a list, or a member that is itself an ensemble.
    """
    if not isinstance(members, (list, tuple)) or not members:
        raise ModelError("an ensemble needs members=[{'arch': NAME, 'arch_kwargs': {...}}, ...] (at least one)")
    out = []
    for i, m in enumerate(members):
        if not isinstance(m, Mapping) or not isinstance(m.get("arch"), str) or not isinstance(m.get("arch_kwargs") or {}, Mapping):
            raise ModelError(f"ensemble member {i}: expected {{'arch': NAME, 'arch_kwargs': {{...}}}}, got {m!r:.80}")
        if m["arch"] == ENSEMBLE_ARCH:
            raise ModelError(f"ensemble member {i} is itself an ensemble (give its members instead)")
        out.append((m["arch"], dict(m.get("arch_kwargs") or {})))
    return out


def member_state_dict(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The state dict of an :class:`EnsembleNet` from its members' state dicts (in order).

    Args:
        members: each member's state dict.
    """
    return {f"{MEMBERS_PREFIX}.{i}.{k}": v for i, sd in enumerate(members) for k, v in sd.items()}
