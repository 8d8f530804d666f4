"""kprune: retraining-free pruning of fine-tuned encoders with K-prune (Park, Choi, Kang, ICLR 2024).

import kprune
result = kprune.prune(model, tokenizer(texts, padding=True, return_tensors="pt"), flops_keep=0.5)
kprune.save_pruned(result.model, "pruned/", record=result.record, tokenizer=tokenizer)
model = kprune.load_pruned("pruned/")
"""

__version__ = "0.1.0"  # before the imports: kprune.io reads it

from kprune.api import prune
from kprune.arch import UnsupportedModelError
from kprune.config import KPruneConfig
from kprune.io import load_pruned, save_pruned
from kprune.record import PruneRecord, PruneResult

__all__ = [
    "KPruneConfig",
    "PruneRecord",
    "PruneResult",
    "UnsupportedModelError",
    "load_pruned",
    "prune",
    "save_pruned",
]
