"""Save and load pruned models.

A pruned-model folder (format version 2) is a hub model repository for a custom architecture:

    config.json          the source model's config under model_type "kprune-<family>", plus
                         heads_per_layer, neurons_per_layer and an auto_map naming the classes below
    modeling_kprune.py   a copy of kprune/modeling_kprune.py (imports only torch and transformers)
    model.safetensors    the weights
    kprune.json          the format version and the PruneRecord
    README.md            the model card
    tokenizer files      when a tokenizer is given

so ``AutoModelFor...from_pretrained(folder, trust_remote_code=True)`` loads it without kprune. Version 1
folders (the unpruned config, ``pruned.safetensors``, counts in ``kprune.json``) load with
:func:`load_pruned` too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from kprune import __version__, modeling_kprune
from kprune.arch import family_of
from kprune.atomic import atomic_folder
from kprune.card import model_card
from kprune.sublayer import unit_counts

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODELING_FILE = "modeling_kprune.py"
META_FILE = "kprune.json"
CARD_FILE = "README.md"
FORMAT = "kprune-pruned-model"
FORMAT_VERSION = 2
V1_WEIGHTS_FILE = "pruned.safetensors"
# Keys of a config's to_dict that describe its class, not the model; each config class writes its own.
_CLASS_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")


def _stock_class(model_class: type) -> type:
    """The transformers class a model class is (or subclasses)."""
    return next(cls for cls in model_class.__mro__ if cls.__module__.startswith("transformers."))


def _pruned_class(stock_class: type) -> type:
    """modeling_kprune's class for a transformers task model class."""
    pruned = getattr(modeling_kprune, f"KPruned{stock_class.__name__}", None)
    if pruned is None:
        raise ValueError(f"kprune cannot save a {stock_class.__name__} as a pruned-model folder")
    return pruned


def _auto_class(model_class: type) -> str:
    head = (
        "QuestionAnswering"
        if model_class.__name__.endswith("QuestionAnswering")
        else "SequenceClassification"
    )
    return f"AutoModelFor{head}"


def pruned_config(model: nn.Module):
    """The config a pruned folder carries: the model's config with its per-layer counts and auto_map."""
    family_of(model)  # unsupported families fail here
    model_class = _pruned_class(_stock_class(type(model)))
    config_class = model_class.config_class
    heads, neurons = unit_counts(model)
    fields = {key: value for key, value in model.config.to_dict().items() if key not in _CLASS_KEYS}
    config = config_class.from_dict({**fields, "heads_per_layer": heads, "neurons_per_layer": neurons})
    module = Path(MODELING_FILE).stem
    config.architectures = [model_class.__name__]
    config.auto_map = {
        "AutoConfig": f"{module}.{config_class.__name__}",
        _auto_class(model_class): f"{module}.{model_class.__name__}",
    }
    return config


def save_pruned(
    model: nn.Module,
    directory: str | Path,
    *,
    record=None,
    tokenizer=None,
    metrics: Mapping[str, Mapping] | None = None,
    command: str | None = None,
) -> Path:
    """Write a pruned model into ``directory``: config, weights, modeling file, kprune.json, model card.

    record: its PruneRecord; tokenizer: saved beside it (a pipeline needs one); metrics: measured
    metrics by data set, for the card; command: the command line that made it, for the card.

    The folder is written as a sibling and swapped in whole (kprune.atomic): an interrupted save leaves
    the previous model intact. A non-empty folder not written by kprune is refused, never replaced."""
    directory = Path(directory)
    check_replaceable(directory)
    with atomic_folder(directory) as temporary:
        _write_pruned(model, temporary, record, tokenizer, metrics, command)
    return directory


def check_replaceable(directory: Path, name: str = "") -> None:
    """Refuse a non-empty folder that kprune did not write: save_pruned never replaces one. ``name``
    prefixes the message (the CLI says which option gave the folder)."""
    if directory.is_dir() and any(directory.iterdir()) and not is_pruned_folder(directory):
        raise FileExistsError(
            f"{name}{directory} is a non-empty folder not written by kprune; choose another"
        )


def _write_pruned(model: nn.Module, directory: Path, record, tokenizer, metrics, command) -> None:
    pruned_config(model).save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    shutil.copyfile(modeling_kprune.__file__, directory / MODELING_FILE)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "record": record.to_dict() if record is not None else None,
        "metrics": dict(metrics or {}),
        "command": command,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    write_card(model, directory, meta)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_card(model: nn.Module, directory: str | Path, meta: Mapping) -> None:
    """(Re)write the folder's README.md from its kprune.json contents."""
    card = model_card(
        model,
        meta.get("record"),
        metrics=meta.get("metrics"),
        command=meta.get("command"),
        version=__version__,
    )
    (Path(directory) / CARD_FILE).write_text(card)


def add_metrics(model: nn.Module, directory: str | Path, data: str, metrics: Mapping) -> None:
    """Record metrics measured on ``data`` in a pruned folder's kprune.json and model card."""
    meta = read_meta(directory)
    meta["metrics"] = {**(meta.get("metrics") or {}), data: dict(metrics)}
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=1))
    write_card(model, directory, meta)


def read_meta(directory: str | Path) -> dict:
    """The folder's kprune.json; for a folder that only the save_pretrained of a loaded pruned model
    wrote (no kprune.json), format 2 with no record."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        if _has_pruned_config(directory):
            return {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "record": None,
                "metrics": {},
                "command": None,
            }
        raise FileNotFoundError(f"{directory} is not a kprune pruned-model folder (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is damaged (not JSON: {error}); prune again into a new folder") from error
    if meta.get("format") != FORMAT or meta.get("version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{path}: unknown format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def _has_pruned_config(directory: Path) -> bool:
    path = directory / CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()).get("model_type", "").startswith("kprune-")


def load_pruned(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A pruned model saved by :func:`save_pruned` (or by a loaded one's save_pretrained), in eval mode,
    without remote code.

    The model is modeling_kprune's subclass of the family's transformers class, built at the pruned
    shapes; its ``save_pretrained`` writes a folder that loads the same way (with the modeling file)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta["version"] == 1:
        return _load_v1(directory, meta, device)
    architecture = (json.loads((directory / CONFIG_FILE).read_text()).get("architectures") or [""])[0]
    model_class = getattr(modeling_kprune, architecture, None)
    if model_class is None:
        raise ValueError(f"{directory / CONFIG_FILE}: {architecture!r} is not a kprune model class")
    _register_for_auto_classes(model_class)
    with _weights_matching(directory / WEIGHTS_FILE, directory / CONFIG_FILE):
        model = _checked(model_class.from_pretrained(directory, output_loading_info=True))
    return model.to(device).eval()


@contextlib.contextmanager
def _weights_matching(weights: Path, counts: Path) -> Iterator[None]:
    """Loading errors as one ValueError naming the file: unreadable weights, or counts (per-layer heads and
    neurons) that do not match them. transformers' own report of mismatched weights is kept off the console:
    the error says it in one line."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    except SafetensorError as error:
        raise ValueError(
            f"{weights} is unreadable or truncated ({error}); prune again or restore it"
        ) from error
    except (ValueError, RuntimeError, KeyError) as error:  # shapes or names that differ from the weights
        detail = str(error).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{counts} does not match {weights} ({detail}); prune again or restore both"
        ) from error
    finally:
        transformers.logging.set_verbosity(verbosity)


def _checked(loaded: tuple[nn.Module, dict]) -> nn.Module:
    """The model from_pretrained(output_loading_info=True) built, if every weight matched (it would
    otherwise initialise missing or mis-shaped weights at random)."""
    model, info = loaded
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise KeyError(f"{kind.replace('_', ' ')}: {', '.join(map(str, sorted(info[kind])[:3]))}")
    return model


def _register_for_auto_classes(model_class: type) -> None:
    """So that save_pretrained writes the auto_map and copies modeling_kprune.py, as remote code does."""
    model_class.register_for_auto_class(_auto_class(model_class))
    model_class.config_class.register_for_auto_class()


def _load_v1(directory: Path, meta: dict, device: str | torch.device) -> nn.Module:
    stock_class = getattr(transformers, meta["architecture"], None)
    if stock_class is None:
        raise ValueError(f"transformers has no model class {meta['architecture']!r}")
    model_class = _pruned_class(stock_class)
    fields = json.loads((directory / CONFIG_FILE).read_text())
    fields = {key: value for key, value in fields.items() if key not in _CLASS_KEYS}
    counts = {"heads_per_layer": meta["heads_per_layer"], "neurons_per_layer": meta["neurons_per_layer"]}
    config = model_class.config_class.from_dict({**fields, **counts})
    _register_for_auto_classes(model_class)
    # from_pretrained builds the model on the meta device and assigns the given weights.
    weights = directory / V1_WEIGHTS_FILE
    with _weights_matching(weights, directory / META_FILE):
        state_dict = load_file(weights)
        model = _checked(
            model_class.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True)
        )
    return model.to(device).eval()


def is_pruned_folder(path: str | Path) -> bool:
    """A folder :func:`load_pruned` reads (kprune.json, or a kprune model's config)."""
    path = Path(path)
    return (path / META_FILE).is_file() or _has_pruned_config(path)
