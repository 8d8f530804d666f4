"""Models in and out: loading a fine-tuned model and its tokenizer, the device, the model's own forward.

``load_model`` has the loading rules of ``kprune prune --model``; the pipeline and the benchmarks use it
too, so a model that one accepts, all accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import transformers
from torch import nn

from kprune.arch import QUESTION_ANSWERING, UnsupportedModelError, family_of, task_of
from kprune.io import is_pruned_folder, load_pruned


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def model_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own forward: (B, C) logits, or (B, S, 2) start/end logits for QA."""
    outputs = model(**batch)
    if task_of(model) == QUESTION_ANSWERING:
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)
    return outputs.logits


def model_batch(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without inputs the model does not take (DistilBERT has no segment embeddings)."""
    if family_of(model).name == "distilbert":
        return {name: value for name, value in batch.items() if name != "token_type_ids"}
    return batch


def load_task_model(name_or_path: str, device: torch.device) -> nn.Module:
    """The model of :func:`load_model`, without its tokenizer, in eval mode."""
    if not Path(name_or_path).expanduser().exists() and _looks_like_path(name_or_path):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    try:
        if is_pruned_folder(name_or_path):
            model = load_pruned(name_or_path, device)
        else:
            model = _task_model_class(name_or_path).from_pretrained(name_or_path).to(device).eval()
    except OSError as error:  # not found, offline, ...
        raise OSError(f"cannot load model {name_or_path!r}: {error}") from error
    family_of(model)  # unsupported families and heads fail here, before any pruning work
    task_of(model)
    return model


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    path = Path(name).expanduser()
    return path.is_absolute() or name.startswith((".", "~")) or len(path.parts) > 2 or "\\" in name


def _task_model_class(name_or_path: str) -> type:
    architectures = transformers.AutoConfig.from_pretrained(name_or_path).architectures or []
    if any(name.endswith("ForQuestionAnswering") for name in architectures):
        return transformers.AutoModelForQuestionAnswering
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return transformers.AutoModelForSequenceClassification
    raise UnsupportedModelError(
        f"{name_or_path} is not a fine-tuned classifier or QA model (architectures: "
        f"{architectures or 'none'}); kprune preserves a fine-tuned model's predictions, so "
        "fine-tune it first ('kprune demo' shows the mechanics on a pretrained MiniLM)"
    )


def load_model(name_or_path: str, device: torch.device) -> tuple[nn.Module, object]:
    """A fine-tuned classifier / regressor / QA model and its tokenizer, from a kprune folder, a local
    folder or a hub id."""
    model = load_task_model(name_or_path, device)
    try:
        # The model's config: a pruned folder's own config.json names remote code, which kprune never runs.
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, config=model.config)
    except OSError as error:  # not found, offline, no tokenizer files, ...
        raise OSError(f"cannot load the tokenizer of {name_or_path!r}: {error}") from error
    if not tokenizer.is_fast:
        raise UnsupportedModelError(f"{name_or_path}: kprune needs a fast (Rust) tokenizer")
    if Path(name_or_path).expanduser().is_dir():
        check_own_tokenizer(Path(name_or_path).expanduser(), tokenizer)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise UnsupportedModelError(
            f"the tokenizer of {name_or_path} holds only its {len(tokenizer)} special tokens: every word "
            "would be unknown; give the model the tokenizer it was fine-tuned with"
        )
    check_finite_weights(model, name_or_path)
    return model, tokenizer


def check_own_tokenizer(folder: Path, tokenizer) -> None:
    """One error if a model folder has no tokenizer files: transformers then builds a tokenizer of the
    special tokens alone, which reads every word as unknown, and nothing else would notice."""
    files = dict(type(tokenizer).vocab_files_names)
    if (folder / files.pop("tokenizer_file", "tokenizer.json")).is_file():
        return
    if files and all((folder / name).is_file() for name in files.values()):
        return
    needed = " or ".join(["tokenizer.json", " + ".join(files.values())] if files else ["tokenizer.json"])
    raise UnsupportedModelError(
        f"model folder {folder} has no tokenizer of its own ({needed}); save the tokenizer the model was "
        f"fine-tuned with into it: tokenizer.save_pretrained({str(folder)!r})"
    )


def check_finite_weights(model: nn.Module, where: str | Path = "the model") -> None:
    """One ValueError naming the parameters that hold NaN or Inf."""
    bad = [name for name, value in model.named_parameters() if not torch.isfinite(value).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"{where} has NaN or Inf weights in {shown}; the model file is damaged or diverged")


@torch.no_grad()
def check_finite_activations(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """One ValueError naming the first module whose output holds NaN or Inf on ``batch``."""
    first: list[str] = []

    def watch(name: str):
        def hook(module, inputs, output) -> None:
            tensors = output if isinstance(output, tuple) else (output,)
            finite = all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor))
            if not first and not finite:
                first.append(name)

        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules() if name]
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if first:
        raise ValueError(
            f"the model's activations hold NaN or Inf from {first[0]} on the sample, although its weights "
            f"are finite: values overflow {next(model.parameters()).dtype}; check the model and its inputs"
        )
