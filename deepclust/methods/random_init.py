"""Random-init reference (lower bound): the backbone as initialised, never trained."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method


class RandomInit(Method):
    name = "random"
    eval_feature = "pooled"
    trains = False

    @dataclass
    class Config:
        pass
