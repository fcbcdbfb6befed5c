"""federation.memory: glibc's malloc tuned for training, and trimmed to keep memory flat."""

from __future__ import annotations

import resource

import pytest
import torch

from federation import memory

glibc = pytest.mark.skipif(memory._libc() is None, reason="not glibc")


@glibc
def test_a_training_process_reuses_its_buffers_pages():
    """With the thresholds fixed, freeing and allocating a step's large buffers again faults in
    (almost) no new pages."""
    assert memory.keep_buffers_in_heap()
    for _ in range(3):  # warm up: the heap grows to hold the buffers once
        bufs = [torch.ones(1 << 20) for _ in range(6)]  # 4 MB each, like a step's gradients
        del bufs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        bufs = [torch.ones(1 << 20) for _ in range(6)]
        del bufs
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 100  # untuned: ~8,000 (each 4 MB buffer mmapped, or the heap's top trimmed, and faulted in again)
