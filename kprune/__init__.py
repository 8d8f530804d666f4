"""kprune: retraining-free pruning of fine-tuned encoders with K-prune (Park, Choi, Kang, ICLR 2024).

import kprune
result = kprune.prune(model, tokenizer(texts, padding=True, return_tensors="pt"), flops_keep=0.5)
kprune.save_pruned(result.model, "pruned/", record=result.record, tokenizer=tokenizer)
model = kprune.load_pruned("pruned/")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names and their modules, imported on first use: `import kprune.cli` (and so `kprune
# --help`) then loads neither torch nor transformers. (kprune.io reads __version__ above.)
_EXPORTS = {
    "KPruneConfig": "kprune.config",
    "PruneRecord": "kprune.record",
    "PruneResult": "kprune.record",
    "UnsupportedModelError": "kprune.arch",
    "load_pruned": "kprune.io",
    "prune": "kprune.api",
    "save_pruned": "kprune.io",
}
__all__ = [
    "KPruneConfig",
    "PruneRecord",
    "PruneResult",
    "UnsupportedModelError",
    "load_pruned",
    "prune",
    "save_pruned",
]

if TYPE_CHECKING:
    from kprune.api import prune
    from kprune.arch import UnsupportedModelError
    from kprune.config import KPruneConfig
    from kprune.io import load_pruned, save_pruned
    from kprune.record import PruneRecord, PruneResult


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
