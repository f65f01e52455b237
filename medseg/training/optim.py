"""Optimisers by name (``train.optim.name``): one registry entry per optimiser.

An entry builds a ``torch.optim.Optimizer`` from the net's parameters and ``OptimParams``.
To add one: ``OPTIMIZERS.register("lion", build_lion)``, or declare ``build_lion`` under the
entry-point group ``medseg.optimizers`` of an installed package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from medseg.params import Params
from medseg.registry import Registry, callable_entry

if TYPE_CHECKING:
    import torch

OptimizerBuilder = Callable[[Iterable["torch.nn.Parameter"], "OptimParams"], "torch.optim.Optimizer"]
"""``build(parameters, params) -> optimizer``."""

OPTIMIZERS: Registry[OptimizerBuilder] = Registry(
    "optimiser", group="medseg.optimizers", adapt=callable_entry
)


class OptimParams(Params):
    """Optimiser settings: ``name`` (a registered optimiser), learning rate, decay, momentum (SGD)."""

    name: str = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)

    @model_validator(mode="after")
    def _registered(self) -> OptimParams:
        OPTIMIZERS.lookup(self.name)
        return self


def build_optimizer(parameters: Iterable[torch.nn.Parameter], params: OptimParams) -> torch.optim.Optimizer:
    """The optimiser ``params`` names, over ``parameters``."""
    return OPTIMIZERS.lookup(params.name)(parameters, params)


def _adam(parameters: Iterable[torch.nn.Parameter], params: OptimParams) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(parameters, lr=params.lr, weight_decay=params.weight_decay)


def _adamw(parameters: Iterable[torch.nn.Parameter], params: OptimParams) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay)


def _sgd(parameters: Iterable[torch.nn.Parameter], params: OptimParams) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(
        parameters, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay, nesterov=True
    )


OPTIMIZERS.register("adam", _adam)
OPTIMIZERS.register("adamw", _adamw)
OPTIMIZERS.register("sgd", _sgd)
