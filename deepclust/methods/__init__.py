"""Every method, by name: a plain dict."""

from .anchor_neighbourhood import AND
from .base import Batch, EpochContext, Method
from .deepcluster import DeepCluster
from .deepclusterv2 import DeepClusterV2
from .invariant_spreading import InvariantSpreading
from .npid import NPID
from .odc import ODC
from .pad import PAD
from .pcp import PCP
from .random_init import RandomInit
from .sela import SeLa
from .supervised import Supervised
from .swav import SwAV
from .uic import UIC

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (Supervised, RandomInit, NPID, InvariantSpreading, AND, PCP, PAD, DeepCluster, ODC, UIC,
                SwAV, DeepClusterV2, SeLa)
}

__all__ = ["METHODS", "Batch", "EpochContext", "Method"]
