"""Native CPU kernels for local training (models/native.cpp): compiled once per machine, optional.

A local step multiplies thin matrices (8 x 20 words, a 96-d projection), and PyTorch runs the
element-wise work around those products as many small passes over memory: the LSTM's gates at
each time step, the softmax over 10 k words, the subword composition of the word table,
gradient clipping and SGD.  The kernels fuse each into one or two passes.  The forward's
products are theirs too, by a small packed-panel kernel: the LSTM's input products, its
recurrence's (8 rows at each time step, where BLAS runs at about half speed) and the output
layer's logits, computed vocabulary chunk by chunk (each chunk of the table in L2) so that
their softmax runs while they are in cache.  The backward's products stay ATen's (MKL).
models/fused.py uses the kernels when `load()` has succeeded in the process, and its PyTorch
version of each otherwise; the two agree to float rounding (tests/test_models_fused.py).

`load()` is called by the federation engines (the main process, then every worker) and by
bench/bench_train_step.py.  The keyboard does not call it, so it never waits on a compiler.
The first call on a machine compiles the kernels (a C++ compiler and Python's headers, ~1 min) into
~/.cache/fedkb/native; later calls import the cached build in about a second.  Where compiling
fails, or with FEDKB_NATIVE=0, training runs the PyTorch versions.  The build uses the widest
vectors torch itself uses on the machine: AVX-512 where it has them (16 floats a register, twice
AVX2's, and so twice the matrix-product peak that MKL reaches), else AVX2; and OpenMP, so that
they split their work over torch's threads (each output in a fixed order: the same bits on any
number of threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialized
    fcntl = None

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
    if _tried or _turned_off() or not isa():
        return False
    try:
        return not _cached(build_dir(_plan()[0]))  # the build load() tries first
    except OSError:
        return False


def _turned_off() -> bool:
    return os.environ.get("FEDKB_NATIVE", "1") == "0"


def _cached(where: Path) -> bool:
    return any(where.glob("*.so"))


# Compiler flags per instruction set; CPU_CAPABILITY makes ATen's Vectorized<float> as wide as the
# build (8 floats with AVX2, 16 with AVX-512), as in ATen's own per-capability kernels.
FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}


def isa() -> str | None:
    """The vector instructions the kernels are built for: the widest torch itself runs on this CPU
    ("AVX512" or "AVX2"; FEDKB_NATIVE=avx2 asks for AVX2 on an AVX-512 machine), None on others."""
    import torch

    cpu = torch.backends.cpu.get_cpu_capability()
    if cpu == "AVX512" and os.environ.get("FEDKB_NATIVE", "").lower() == "avx2":
        return "AVX2"
    return cpu if cpu in FLAGS else None


# OpenMP: ATen's at::parallel_for, compiled into the kernels from its headers, splits work over
# torch's threads only in an OpenMP build (without it every kernel runs on one thread, whatever
# torch.set_num_threads says).  libgomp.so.1 is the runtime torch's own wheel ships and loads, so
# the kernels share torch's thread pool and thread count.  A compiler without OpenMP builds them
# without it (one thread each).
OPENMP = ["-fopenmp"]


def cflags(target: str, openmp: bool = True) -> list[str]:
    return ["-O3", *(OPENMP if openmp else []), *FLAGS[target]]


def build_dir(openmp: bool = True) -> Path:
    """Where the build is cached: one folder per source, compiler flags, torch version, Python and
    instruction set."""
    import torch

    target = isa()
    flags = " ".join(cflags(target, openmp)) if target else ""
    key = hashlib.sha256(SOURCE.read_bytes() + flags.encode() + torch.__version__.encode() + sys.version.encode()
                         + str(target).encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedkb" / "native"
    return root / key


@contextlib.contextmanager
def _building(where: Path):
    """Hold `where/fedkb.lock` (an exclusive flock) while building, or loading, the kernels there.

    torch's own lock for a build folder (`where/lock`, its FileBaton) is a plain file that the
    builder deletes when done: a build killed mid-way (kill -9, the out-of-memory killer) leaves
    it behind, and every later build in that folder would then wait on it forever, silently.  Under this lock no other fedkb process is building there, so a baton found is
    stale and is removed.  The kernel drops a flock when its holder dies."""
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "fedkb.lock", "a+") as f:
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                locked = True
            except OSError:  # a file system without locks: build without (as torch alone would)
                pass
        baton = where / "lock"
        if locked and baton.exists():
            log.warning("native kernels: removing %s, left behind by a build that was killed", baton)
            baton.unlink()
        yield  # the flock goes with the file's closing


def _source_in(where: Path) -> Path:
    """A copy of the source inside the build folder, the file the build compiles: every checkout
    with this source then builds the same command, where building each checkout's own path made
    two checkouts sharing the cache recompile each other's build at every switch."""
    from models import atomic

    src, data = where / SOURCE.name, SOURCE.read_bytes()
    if not src.exists() or src.read_bytes() != data:
        atomic.write_bytes(src, data)
    return src


def _plan() -> list[bool]:
    """The builds to try, in order (True: with OpenMP).  A cached build without OpenMP exists only
    because the OpenMP one failed to compile here, so it is not tried again."""
    if not _cached(build_dir(True)) and _cached(build_dir(False)):
        return [False]
    return [True, False]


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

        target = isa()
        if target is None:
            return None
        plan = _plan()
        for i, openmp in enumerate(plan):
            where = build_dir(openmp)
            if not _cached(where):
                print("fedkb: compiling native training kernels (once per machine, ~1 min)...", file=sys.stderr, flush=True)
            try:
                with _building(where):
                    _module = build("fedkb_native", [str(_source_in(where))], extra_cflags=cflags(target, openmp),
                                    extra_ldflags=OPENMP if openmp else [], build_directory=str(where), verbose=False)
                break
            except Exception as e:
                if i + 1 == len(plan):
                    raise
                log.info("native kernels: no OpenMP build (%s); building them for one thread", _first_line(e))
    except Exception as e:  # no compiler, no headers, no ninja...: the PyTorch versions run instead
        log.warning("native training kernels unavailable (%s); training uses the PyTorch versions", _first_line(e))
        _module = None
    return _module


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
