"""Memory of a prune: where the loop keeps whole-sample hidden states (one (B, S, d) tensor per batch),
the allocator's handling that keeps freed memory from piling up (the mmap threshold; freed heap pages
handed back after each step; oneDNN's kernel cache kept small), and the process's resident memory as
the pipeline and the benchmarks report it.

K-prune carries two whole-sample states from sublayer to sublayer, the student's input and the teacher's.
In memory they are a list of tensors. Offloaded, they live in an unlinked temporary file that is read and
written one batch at a time: only the batch at hand is in RAM (the operating system's page cache keeps
the rest while memory allows, and may write it out when it does not), so peak memory no longer grows
with the sample.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch


class OffloadedStates:
    """A list of CPU tensors kept in a temporary file: indexing reads a batch, assigning writes it back.

    Each slot keeps the shape, dtype and device of the tensor first written to it."""

    def __init__(self, batches: Iterable[torch.Tensor] = (), folder: str | Path | None = None):
        self.file = tempfile.TemporaryFile(dir=folder, prefix="kprune-states-")  # deleted when closed
        self.slots: list[tuple[int, torch.Size, torch.dtype, torch.device]] = []
        self.end = 0
        for batch in batches:
            self.append(batch)

    def append(self, tensor: torch.Tensor) -> None:
        """Write a new slot at the end of the file."""
        self.slots.append((self.end, tensor.shape, tensor.dtype, tensor.device))
        self.end += tensor.numel() * tensor.element_size()
        self[len(self.slots) - 1] = tensor

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index: int) -> torch.Tensor:
        offset, shape, dtype, device = self.slots[index]
        tensor = torch.empty(shape, dtype=dtype)
        if not tensor.numel():  # nothing to read (a sublayer with no unit left has empty features)
            return tensor.to(device)
        view = memoryview(tensor.numpy()).cast("B")
        if os.preadv(self.file.fileno(), [view], offset) != len(view):
            raise OSError(f"short read of batch {index} from the offloaded hidden states")
        return tensor.to(device)

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        offset, shape, dtype, _ = self.slots[index]
        if tensor.shape != shape or tensor.dtype != dtype:
            raise ValueError(
                f"batch {index} is {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if not tensor.numel():
            return
        data = np.ascontiguousarray(tensor.detach().cpu().numpy())
        view = memoryview(data).cast("B")
        if os.pwritev(self.file.fileno(), [view], offset) != len(view):
            raise OSError(f"short write of batch {index} to the offloaded hidden states (disk full?)")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[index] for index in range(len(self)))

    def close(self) -> None:
        self.file.close()


def hidden_states(batches: Iterable[torch.Tensor], offload: bool) -> list[torch.Tensor] | OffloadedStates:
    """Whole-sample states, taken in one batch at a time: a list, or offloaded to a temporary file."""
    return OffloadedStates(batches) if offload else list(batches)


class StateBuffer:
    """Whole-sample hidden states in RAM, in one buffer: indexing gives a micro-batch's (B, S, d) view and
    assigning copies into it, so advancing the states allocates nothing that outlives a micro-batch.
    (A new tensor per micro-batch and sublayer, interleaved with the temporaries, fragments glibc's heap:
    the rescaling of 20k tokens on a BERT-base peaked at 2.2 GB RSS instead of 1.26 GB.)"""

    def __init__(self, states: Iterable[torch.Tensor], shapes: Sequence[tuple[int, int]]) -> None:
        """states: one (B, S, d) tensor per entry of shapes (B, S), copied in."""
        sizes = [rows * length for rows, length in shapes]
        self.views: list[torch.Tensor] = []
        for number, state in enumerate(states):
            if number == 0:
                buffer = state.new_empty(sum(sizes), state.shape[-1])
                parts = buffer.split(sizes)
                self.views = [part.view(*shape, -1) for part, shape in zip(parts, shapes, strict=True)]
            self[number] = state

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.views[index]

    def __setitem__(self, index: int, state: torch.Tensor) -> None:
        if state.shape != self.views[index].shape:
            raise ValueError(f"state {index} is {tuple(self.views[index].shape)}, got {tuple(state.shape)}")
        self.views[index].copy_(state)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.views)


HiddenStates = StateBuffer | OffloadedStates  # one (B, S, d) tensor per micro-batch


def hidden_state_buffer(
    states: Iterable[torch.Tensor], shapes: Sequence[tuple[int, int]], offload: bool
) -> HiddenStates:
    """Whole-sample states of known (B, S) shapes, taken in one batch at a time: one preallocated buffer in
    RAM, or offloaded to a temporary file."""
    return OffloadedStates(states) if offload else StateBuffer(states, shapes)


def offload_default(device: torch.device) -> bool:
    """Offload on the CPU, where RAM is the limit; on an accelerator the states stay in its memory."""
    return device.type == "cpu"


# glibc's malloc raises its mmap threshold each time a large block is freed, after which blocks of a few
# MB come from the heap, where alternating sizes fragment it: a CPU prune then holds hundreds of MB of
# freed memory (measured: 2.27 GB -> 1.61 GB peak on a BERT-base prune of 40k tokens).
M_MMAP_THRESHOLD = -3
# With the threshold fixed, every block above it is a fresh mapping whose pages fault on first touch.
# torch backs allocations of 2 MB or more with transparent huge pages when TORCH_HUGE_PAGES is set (read
# at its first large allocation): one fault per 2 MB. The threshold sits at that size, so that no mapping
# is left on 4 kB pages: at 1 MB, the 1-2 MB tensors of a MiniLM prune cost 256-512 faults each, about
# 18% of its CPU time. Measured at 2 MB against 1 MB (MiniLM teacher, 100k tokens, budget 0.5, alone,
# two runs each): 0.89x the time, 1.10x the peak RSS.
MMAP_THRESHOLD_BYTES = 2 << 20
TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
# oneDNN, which runs torch's CPU GELU, compiles a kernel for every tensor shape it meets and caches up to
# 1,024 of them, each in its own code buffer. A prune meets hundreds of shapes (every batch length times
# every kept width, forward and backward): on a MiniLM prune of 100k tokens the cache was about 100 MB of
# the live memory at the peak (memray: 392 GELU kernels of 250 kB). A kernel dropped from the cache is
# compiled again when its shape comes back. oneDNN reads the capacity once, when it builds its first kernel.
ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 32


@functools.cache
def _glibc_function(name: str):
    """A function of the C library when it is glibc's (on Linux), else None."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


def configure_cpu_memory() -> bool:
    """Fix glibc's mmap threshold at 2 MB for this process (large tensors then return their memory when
    freed), let torch put its tensors of 2 MB or more on 2 MB pages (so each costs few page faults) and
    keep oneDNN's cache of compiled kernels small (ONEDNN_CACHE_CAPACITY; an environment variable of
    that name set beforehand wins). The threshold is a no-op elsewhere than glibc and Linux; returns
    whether it was applied. The CLI, the pipeline and the benchmarks call it at start-up; call it
    yourself before a large CPU prune in a notebook, before torch allocates its first large tensor or
    runs its first GELU. No setting changes a result."""
    os.environ.setdefault(TORCH_HUGE_PAGES, "1")
    os.environ.setdefault(ONEDNN_CACHE, str(ONEDNN_CACHE_CAPACITY))
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the operating system (glibc's malloc_trim; elsewhere a no-op).

    The blocks under the mmap threshold that a sublayer's step frees stay in glibc's heap, which only
    returns its top: measured at the end of a MiniLM prune of 100k tokens, 175 MB of the 835 MB RSS were
    such pages. The loop calls this after each step, so no step starts on the last ones' leftovers, and
    its tuning every few thousand tokens (kprune.iterate.TRIM_TOKENS)."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status in MB (None without /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MB (None without /proc)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB: the larger of ru_maxrss (kB on Linux, bytes on
    macOS) and, on Linux, VmHWM and the current VmRSS (ru_maxrss can trail the current RSS a little: the
    kernel updates it lazily)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return max(peak, _status_mb("VmHWM") or 0.0, _status_mb("VmRSS") or 0.0)
