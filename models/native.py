"""Native CPU kernels for local training (models/native.cpp): compiled once per machine, optional.

A local step multiplies thin matrices (8 x 20 words, a 96-d projection), and PyTorch runs the
element-wise work around those products as many small passes over memory: the LSTM's gates at
each time step, the softmax over 10 k words, the subword composition of the word table,
gradient clipping and SGD.  The kernels fuse each into one or two passes.  Two kinds of product
are theirs too, by a small packed-panel kernel: the recurrence's (8 rows at each time step,
where BLAS runs at about half speed) and the output layer's logits, computed 8 rows at a time
so that their softmax runs while they are in cache.  The other products stay ATen's (MKL).
models/fused.py uses the kernels when `load()` has succeeded in the process, and its PyTorch
version of each otherwise; the two agree to float rounding (tests/test_models_fused.py).

`load()` is called by the federation engines (the main process, then every worker) and by
bench/bench_train_step.py.  The keyboard does not call it, so it never waits on a compiler.
The first call on a machine compiles the kernels (a C++ compiler and Python's headers, ~1 min) into
~/.cache/fedkb/native; later calls import the cached build in about a second.  Where compiling
fails, or with FEDKB_NATIVE=0, training runs the PyTorch versions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
_module = None  # the loaded kernels
_tried = False


def loaded():
    """The kernels if `load()` succeeded in this process, else None."""
    return _module


def disable() -> None:
    """Use the PyTorch passes in this process from now on (a worker whose parent has no kernels)."""
    global _module, _tried
    _module, _tried = None, True


def will_compile() -> bool:
    """Whether the next `load()` is going to compile (~1 min): not tried yet, not turned off, not cached."""
    if _tried or _turned_off() or not _vector_cpu():
        return False
    try:
        return not _cached(build_dir())
    except OSError:
        return False


def _turned_off() -> bool:
    return os.environ.get("FEDKB_NATIVE", "1") == "0"


def _cached(where: Path) -> bool:
    return any(where.glob("*.so"))


def _vector_cpu() -> bool:
    """The kernels are written for AVX2 vectors (AVX-512 machines have them too)."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_dir() -> Path:
    """Where the build is cached: one folder per source, torch version and Python."""
    import torch

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedkb" / "native"
    return root / key


def load():
    """Compile (first time on a machine) and load the kernels; None where they can't be.

    Never raises: a missing compiler or header is logged once and training runs the PyTorch
    versions."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if _turned_off():
        return None
    try:
        from torch.utils.cpp_extension import load as build

        if not _vector_cpu():
            return None
        where = build_dir()
        if not _cached(where):
            print("fedkb: compiling native training kernels (once per machine, ~1 min)...", file=sys.stderr, flush=True)
        where.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
        _module = build("fedkb_native", [str(SOURCE)], extra_cflags=flags, build_directory=str(where), verbose=False)
    except Exception as e:  # no compiler, no headers, no ninja...: the PyTorch versions run instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("native training kernels unavailable (%s); training uses the PyTorch versions", first)
        _module = None
    return _module
