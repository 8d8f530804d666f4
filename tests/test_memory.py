"""Offloaded hidden states: a list kept in a temporary file, read and written one batch at a time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kprune.memory import (
    ONEDNN_CACHE,
    TORCH_HUGE_PAGES,
    OffloadedStates,
    StateBuffer,
    configure_cpu_memory,
    hidden_state_buffer,
    hidden_states,
    offload_default,
)


def test_offloaded_states_read_back_what_was_written_and_take_updates():
    batches = [torch.randn(2, 3, 4), torch.randn(5, 1, 4), torch.randn(1, 7, 4)]
    states = OffloadedStates(iter(batches))
    assert len(states) == 3
    assert all(torch.equal(a, b) for a, b in zip(states, batches, strict=True))
    replacement = torch.randn(5, 1, 4)
    states[1] = replacement
    assert torch.equal(states[1], replacement) and torch.equal(states[2], batches[2])
    assert states[0] is not states[0]  # every read is a fresh tensor: nothing is kept in memory
    with pytest.raises(ValueError, match="batch 0 is"):
        states[0] = torch.randn(2, 3, 5)
    states.close()


def test_offloaded_states_grow_by_appending_and_keep_empty_tensors():
    states = OffloadedStates()
    batches = [torch.randn(2, 3, 4), torch.empty(2, 3, 0), torch.randn(1, 2, 4)]
    for batch in batches:
        states.append(batch)
    assert [tuple(batch.shape) for batch in states] == [(2, 3, 4), (2, 3, 0), (1, 2, 4)]
    assert torch.equal(states[0], batches[0]) and torch.equal(states[2], batches[2])
    states.close()


def test_state_buffer_holds_every_batch_in_one_allocation_and_copies_updates_in():
    batches = [torch.randn(2, 3, 4), torch.randn(5, 1, 4)]
    states = hidden_state_buffer(iter(batches), [(2, 3), (5, 1)], offload=False)
    assert isinstance(states, StateBuffer) and len(states) == 2
    assert all(torch.equal(a, b) for a, b in zip(states, batches, strict=True))
    base = states[0].untyped_storage().data_ptr()
    assert states[1].untyped_storage().data_ptr() == base  # views of one buffer
    replacement = torch.randn(5, 1, 4)
    states[1] = replacement
    assert torch.equal(states[1], replacement) and states[1].untyped_storage().data_ptr() == base
    with pytest.raises(ValueError, match="state 0 is"):
        states[0] = torch.randn(2, 3, 5)
    assert isinstance(hidden_state_buffer(iter(batches), [(2, 3), (5, 1)], offload=True), OffloadedStates)


def test_hidden_states_are_a_list_unless_offloaded():
    batches = [torch.randn(2, 3)]
    assert isinstance(hidden_states(iter(batches), offload=False), list)
    assert isinstance(hidden_states(iter(batches), offload=True), OffloadedStates)
    assert offload_default(torch.device("cpu")) and not offload_default(torch.device("meta"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_heap_setting_applies_on_linux():
    assert configure_cpu_memory()


FREED_HEAP = """
from kprune.memory import current_rss_mb, release_freed_memory
blocks = [b"x" * (64 << 10) for _ in range(3200)]  # 200 MB of written heap blocks, under any threshold
last = blocks[-1]  # the heap's top stays in use: the others, freed, stay inside the heap
del blocks
before = current_rss_mb()
release_freed_memory()
print(before, current_rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_blocks_go_back_to_the_system():
    completed = subprocess.run(
        [sys.executable, "-c", FREED_HEAP], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    before, after = map(float, completed.stdout.split())
    assert before - after > 150  # of the 200 MB freed


GELU_SHAPES = """
import torch
from kprune.memory import configure_cpu_memory, current_rss_mb
{configure}
torch.nn.functional.gelu(torch.ones(8, 8))
before = current_rss_mb()
for length in range(1, 601):  # a compiled kernel per shape, as a prune's batch lengths and widths give
    torch.nn.functional.gelu(torch.ones(2, length, 16))
print(current_rss_mb() - before)
"""


def printed_by_fresh_process(template: str, configure: str, unset: str) -> float:
    """The last number a fresh interpreter prints running template (with {configure} filled in), without
    the environment variable ``unset``: the settings are read once per process."""
    environment = {k: v for k, v in os.environ.items() if k != unset}
    code = template.format(configure=configure)
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return float(completed.stdout.split()[-1])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_compiled_kernels_of_many_shapes_are_not_all_kept_once_configured():
    kept_all = printed_by_fresh_process(GELU_SHAPES, "", ONEDNN_CACHE)  # oneDNN's default: 1,024 kernels
    assert kept_all > 10
    assert printed_by_fresh_process(GELU_SHAPES, "configure_cpu_memory()", ONEDNN_CACHE) < kept_all / 3


LARGE_TENSOR_PAGES = """
import torch
from kprune.memory import configure_cpu_memory
{configure}
tensor = torch.ones(64 << 18)  # 64 MB, touched
print(sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages")))
"""
THP_MODES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP_MODES.exists() or "[never]" in THP_MODES.read_text(), reason="no transparent huge pages"
)
def test_large_tensors_come_on_huge_pages_once_configured():
    def huge_kb(configure: str) -> float:
        return printed_by_fresh_process(LARGE_TENSOR_PAGES, configure, TORCH_HUGE_PAGES)

    assert huge_kb("") == 0  # torch's default: 4 kB pages
    assert huge_kb("configure_cpu_memory()") >= 32 << 10  # most of the 64 MB on 2 MB pages
