"""Baselines of the K-prune comparison, each returning a kprune.api.PruneResult like kprune.prune.

- :func:`kwon_prune`: Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"
  (Fisher importance from true labels, head-count search, mask rearrangement, least-squares rescaling).
- :func:`magnitude_prune`: weight magnitude per FLOP under the same budget, no tuning.
"""

from kprune.baselines.kwon import KwonConfig, KwonMasks, kwon_masks, kwon_prune
from kprune.baselines.magnitude import magnitude_prune

__all__ = ["KwonConfig", "KwonMasks", "kwon_masks", "kwon_prune", "magnitude_prune"]
