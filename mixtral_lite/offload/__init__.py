"""Experts apart from the model: in host memory beside a GPU, or on disk, with an LRU of experts.

``placement.py`` decides where each layer's experts live (a pure planner), ``stores.py`` holds them
(``Experts`` objects the reference dispatch reads), ``moe.py`` is the layer that sends its routed
tokens to its store, ``cache.py`` the LRU and counters, ``install.py`` puts a placement onto a model.
docs/offloading.md has the design and the measurements.
"""

from .cache import ExpertLRU, OffloadStats
from .install import Offload, offload_experts
from .placement import Placement, plan_placement

__all__ = ["ExpertLRU", "Offload", "OffloadStats", "Placement", "offload_experts", "plan_placement"]
