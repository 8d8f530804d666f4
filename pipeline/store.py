"""What the stages persist: per-token tensors in Arrow, JSON manifests, fingerprints; all writes atomic.

Every file is written under a temporary name beside its final one and renamed into place; a folder is
written as a temporary sibling and swapped in as a whole (``atomic_folder``). A kill at any moment leaves
the old version or the new one, never a mix; leftover temporaries are dot-files, removed by the next write.

Per-token tensors (hidden states, residual sums) are stored without padding, one row per real token, in
the order of the length-sorted sample (``kprune.sample.make_batches``), which does not depend on the batch
size. They are read back one record batch at a time and scattered into padded batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from kprune import atomic
from kprune.atomic import atomic_path
from pipeline.faults import kill_point

if TYPE_CHECKING:
    import datasets

VALUES = "values"


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """kprune.atomic.atomic_folder with the pipeline's kill point ``write:PATH`` just before the swap."""
    with atomic.atomic_folder(path) as temporary:
        yield temporary
        kill_point(f"write:{path}")


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        kill_point(f"write:{path}")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable parts (params, digests, indices)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def folder_digest(path: str | Path) -> str:
    """Digest of every file in a folder (names and contents), in name order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return fingerprint([(str(p.relative_to(path)), file_digest(p)) for p in files])


# ---------------------------------------------------------------- per-token tensors


def write_tokens(
    path: str | Path,
    batches: Sequence[torch.Tensor] | Iterator[torch.Tensor],
    masks: Sequence[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write the real tokens of padded (B, S, *shape) batches as one Arrow IPC file; returns the row count.

    Batches may come from a generator, so only one batch is in memory at a time.
    """
    rows, writer = 0, None
    with atomic_path(path) as temporary:
        try:
            for values, mask in zip(batches, masks, strict=True):
                tokens = values.detach()[mask.bool()].to("cpu", torch.float32)
                width = int(np.prod(tokens.shape[1:]))
                flat = pa.array(tokens.reshape(-1).numpy(), type=pa.float32())
                column = pa.FixedSizeListArray.from_arrays(flat, width)
                if writer is None:
                    schema = pa.schema([(VALUES, column.type)], metadata=_shape_metadata(tokens, metadata))
                    writer = pa.ipc.new_file(str(temporary), schema)
                writer.write_batch(pa.record_batch([column], names=[VALUES]))
                rows += len(tokens)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"no batches to write to {path}")
        kill_point(f"write:{path}")
    return rows


def _shape_metadata(tokens: torch.Tensor, metadata: dict[str, str] | None) -> dict[str, str]:
    return {**(metadata or {}), "token_shape": json.dumps(list(tokens.shape[1:]))}


def token_metadata(path: str | Path) -> dict[str, str]:
    with pa.OSFile(str(path)) as source:
        schema = pa.ipc.open_file(source).schema
    return {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}


def iter_tokens(path: str | Path, masks: Sequence[torch.Tensor], device="cpu") -> Iterator[torch.Tensor]:
    """Padded (B, S, *shape) batches, zeros at padding, for the given attention masks (or per-row masks
    of ones). The file is read one Arrow record batch at a time, without a memory map, so only the
    batch at hand is in memory; the masks may cut the rows differently from the batches that wrote them.
    """
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        shape = json.loads(reader.schema.metadata[b"token_shape"])
        pending, record, total = [], 0, 0
        for mask in masks:
            valid = mask.cpu().bool()
            needed = int(valid.sum())
            while sum(len(rows) for rows in pending) < needed and record < reader.num_record_batches:
                values = reader.get_batch(record).column(VALUES).flatten().to_numpy(zero_copy_only=False)
                pending.append(torch.from_numpy(values.copy()).view(-1, *shape))
                record += 1
            rows = (
                torch.cat(pending) if len(pending) > 1 else pending[0] if pending else torch.empty(0, *shape)
            )
            if len(rows) < needed:
                raise ValueError(f"{path} holds {total + len(rows)} tokens, the batches need more")
            batch = rows.new_zeros(*valid.shape, *shape)
            batch[valid] = rows[:needed]
            pending, total = [rows[needed:]], total + needed
            yield batch.to(device)
        left = sum(len(rows) for rows in pending) + sum(
            reader.get_batch(index).num_rows for index in range(record, reader.num_record_batches)
        )
        if left:
            raise ValueError(f"{path} holds {total + left} tokens, the batches {total}")


def read_tokens(path: str | Path, masks: Sequence[torch.Tensor], device="cpu") -> list[torch.Tensor]:
    return list(iter_tokens(path, masks, device))


# ---------------------------------------------------------------- tokenized tables


def write_dataset(path: str | Path, table: datasets.Dataset) -> None:
    """A ``datasets`` table as an Arrow folder (save_to_disk), replaced as a whole."""
    with atomic_folder(path) as temporary:
        table.save_to_disk(str(temporary))


TABLE_FILE = "table.arrow"


def write_table(path: str | Path, columns: dict[str, torch.Tensor]) -> None:
    """Equal-length tensors (rows first), e.g. a tokenizer's padded output, as a folder holding one Arrow
    IPC file: a row's values of a column with more than one dimension are one fixed-size list, its shape
    in the field's metadata. Written and read with pyarrow alone: ``datasets`` (with pandas, about 70 MB
    of a process's memory) stays out of the stages that only read tensors."""
    fields, arrays = [], []
    for name, tensor in columns.items():
        values = tensor.numpy()
        shape = list(values.shape[1:])
        array = pa.array(values.reshape(-1))
        if shape:
            array = pa.FixedSizeListArray.from_arrays(array, int(np.prod(shape)))
        fields.append(pa.field(name, array.type, metadata={"shape": json.dumps(shape)}))
        arrays.append(array)
    with atomic_folder(path) as temporary, pa.OSFile(str(temporary / TABLE_FILE), "wb") as sink:
        table = pa.table(arrays, schema=pa.schema(fields))
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def read_table(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / TABLE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is missing or was written by an older kprune; rerun the stage that "
            "writes it (dvc repro prepare)"
        )
    with pa.OSFile(str(file)) as source:
        table = pa.ipc.open_file(source).read_all()
    columns = {}
    for field, column in zip(table.schema, table.columns, strict=True):
        shape = json.loads(field.metadata[b"shape"])
        values = column.combine_chunks()
        flat = values.flatten() if shape else values
        columns[field.name] = torch.from_numpy(flat.to_numpy(zero_copy_only=False).copy()).view(-1, *shape)
    return columns
