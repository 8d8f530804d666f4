"""The keys params.yaml may hold, section by section: a key outside them (a typo such as `prune.flops_kep`)
is an error that names it and the allowed ones, raised before any stage does work.

`python -m pipeline run` checks the whole file before it starts `dvc repro` (a stage's outputs are
deleted by DVC when the stage starts, so a later check would come too late for them); every stage checks
its own sections first thing, for a bare `dvc repro` and a stage run by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


class ParamsError(ValueError):
    """A params.yaml that the pipeline cannot run: the message names the key and the fix."""


def allowed_keys() -> dict[str, frozenset[str]]:
    from kprune.config import KPruneConfig
    from pipeline.finetune import FinetuneConfig
    from pipeline.task import COLUMN_OPTIONS, WINDOW

    def fields(config) -> set[str]:
        return {field.name for field in dataclasses.fields(config)}

    return {
        "data": frozenset(
            {"task", "train", "dev", "hub_dataset", *COLUMN_OPTIONS, "allows_no_answer", "label_names"}
            | {"dev_fraction", *WINDOW, "sample_tokens", "seed"}
        ),
        "teacher": frozenset(fields(FinetuneConfig) | {"model", "base", "device"}),
        "calibrate": frozenset({"batch_size", "device"}),
        "prune": frozenset(fields(KPruneConfig) | {"device"}),  # the library's config, unchanged
        "evaluate": frozenset({"batch_size", "latency_batch_sizes", "latency_repeats"}),
    }


def check_params(params: dict, sections: Iterable[str] | None = None) -> None:
    """Raise ParamsError for an unknown section or key (in ``sections`` only, if given)."""
    allowed = allowed_keys()
    if not isinstance(params, dict):
        raise ParamsError("params.yaml must be a mapping of sections (data, teacher, calibrate, ...)")
    unknown_sections = sorted(set(params) - set(allowed))
    if unknown_sections and sections is None:
        raise ParamsError(
            f"params.yaml: unknown section {unknown_sections[0]!r}; the sections are {', '.join(allowed)}"
        )
    for section in allowed if sections is None else sections:
        values = params.get(section)
        if values is None:
            raise ParamsError(f"params.yaml has no section {section!r}")
        if not isinstance(values, dict):
            raise ParamsError(f"params.yaml: section {section!r} must be a mapping of keys to values")
        unknown = sorted(set(values) - allowed[section])
        if unknown:
            raise ParamsError(
                f"params.yaml: unknown key {section}.{unknown[0]}; the keys of {section!r} are "
                f"{', '.join(sorted(allowed[section]))}"
            )
