"""Every method, by name: a plain dict."""

from .base import Batch, EpochContext, Method
from .npid import NPID
from .random_init import RandomInit
from .supervised import Supervised

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (NPID, Supervised, RandomInit)
}

__all__ = ["METHODS", "Batch", "EpochContext", "Method"]
