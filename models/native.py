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
~/.cache/fedkb/native ($XDG_CACHE_HOME/fedkb/native where set); later calls import the cached build in
about a second, a read-only cache's too.  Where compiling fails, or with FEDKB_NATIVE=0, training runs
the PyTorch versions; a failed build leaves a note (`failed`, in its folder) that keeps later processes
from trying again with the same compiler until it is deleted.  The build uses the widest
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
import shutil
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
    """Whether the next `load()` is going to compile (~1 min): not tried yet, not turned off, not
    cached, not failed here before."""
    if _tried or _turned_off() or not isa():
        return False
    try:
        plan = _plan()
        return bool(plan) and not _cached(plan[0])  # the build load() tries first
    except OSError:
        return False


def _turned_off() -> bool:
    return os.environ.get("FEDKB_NATIVE", "1") == "0"


def _name(openmp: bool) -> str:
    """The extension's name: one per build, so that torch, which renames a second build of one name in
    a process (`_v1`, the name a later process then does not find), never renames either."""
    return "fedkb_native_omp" if openmp else "fedkb_native_1t"


def _library(openmp: bool = True) -> Path:
    """The file a complete build leaves: the one torch imports."""
    return build_dir(openmp) / (_name(openmp) + (".pyd" if sys.platform == "win32" else ".so"))


def _cached(openmp: bool) -> bool:
    return _library(openmp).exists()


FAILED = "failed"  # the note a failed build leaves in its folder: the compiler, then the error


def _compiler() -> str:
    """The C++ compiler torch's build runs ($CXX, else c++), as a path where it is found."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or cxx


def _failed(openmp: bool) -> Path | None:
    """The note of a build that failed in its folder with this compiler, if any."""
    note = build_dir(openmp) / FAILED
    try:
        first = note.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    except OSError:
        return None
    return note if first == "compiler: " + _compiler() else None


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


class _Unwritable(Exception):
    """The build folder cannot be created or written (a read-only cache, a full disk)."""


@contextlib.contextmanager
def _building(where: Path):
    """Hold `where/fedkb.lock` (an exclusive flock) while building, or loading, the kernels there;
    yields the source to build (`_source_in`).  A folder that cannot be written raises _Unwritable.

    torch's own lock for a build folder (`where/lock`, its FileBaton) is a plain file that the
    builder deletes when done: a build killed mid-way (kill -9, the out-of-memory killer) leaves
    it behind, and every later build in that folder would then wait on it forever, silently.  Under this lock no other fedkb process is building there, so a baton found is
    stale and is removed.  The kernel drops a flock when its holder dies."""
    try:
        where.mkdir(parents=True, exist_ok=True)
        f = open(where / "fedkb.lock", "a+")
    except OSError as e:
        raise _Unwritable(e) from e
    with f:
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                locked = True
            except OSError:  # a file system without locks: build without (as torch alone would)
                pass
        baton = where / "lock"
        try:
            if locked and baton.exists():
                log.warning("native kernels: removing %s, left behind by a build that was killed", baton)
                baton.unlink()
            src = _source_in(where)
        except OSError as e:
            raise _Unwritable(e) from e
        yield src  # the flock goes with the file's closing


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
    """The builds to try, in order (True: with OpenMP), less those that failed here before with this
    compiler.  A cached build without OpenMP exists only because the OpenMP one failed to compile
    here, so it is not tried again."""
    if not _cached(True) and _cached(False):
        return [False]
    return [openmp for openmp in (True, False) if _failed(openmp) is None]


def _import(path: Path):
    """Import a complete build as it is, without torch's build step (which writes in its folder)."""
    import importlib.util

    import torch  # noqa: F401  (the kernels link against the libraries torch loads)

    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mark_failed(where: Path, e: Exception) -> Path | None:
    """Leave the note that keeps later processes from trying this build again; None where it cannot."""
    from models import atomic

    try:
        atomic.write_text(where / FAILED, f"compiler: {_compiler()}\n{str(e).strip() or type(e).__name__}\n")
        return where / FAILED
    except OSError:
        return None


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
        if not plan:
            log.warning("native training kernels unavailable: their build failed here before (%s); training uses the "
                        "PyTorch versions", _see([build_dir(o) / FAILED for o in (True, False)]))
            return None
        announced, notes = False, []
        for i, openmp in enumerate(plan):
            where = build_dir(openmp)
            try:
                with _building(where) as src:
                    if not announced and not _cached(openmp):
                        print("fedkb: compiling native training kernels (once per machine, ~1 min)...", file=sys.stderr, flush=True)
                        announced = True
                    # fresh lists: torch appends its own flags to them (to OPENMP itself, which moved build_dir)
                    _module = build(_name(openmp), [str(src)], extra_cflags=cflags(target, openmp),
                                    extra_ldflags=list(OPENMP) if openmp else [], build_directory=str(where), verbose=False)
                with contextlib.suppress(OSError):
                    (where / FAILED).unlink(missing_ok=True)  # one left by another compiler
                break
            except _Unwritable as e:
                if _cached(openmp):  # a complete build in a read-only cache
                    log.info("native kernels: %s cannot be written (%s); loading its build as it is", where, e)
                    _module = _import(_library(openmp))
                    break
                log.warning("native training kernels unavailable: their cache folder %s cannot be written (%s); set "
                            "XDG_CACHE_HOME to a writable folder to build them there; training uses the PyTorch versions", where, e)
                return None
            except Exception as e:
                notes += [n for n in [_mark_failed(where, e)] if n is not None]
                if i + 1 < len(plan):
                    log.info("native kernels: no OpenMP build (%s); building them for one thread", _first_line(e))
                    continue
                log.warning("native training kernels unavailable (%s); training uses the PyTorch versions",
                            _first_line(e) + (f"; {_see(notes)}" if notes else ""))
                return None
    except Exception as e:  # no compiler, no headers, no ninja...: the PyTorch versions run instead
        log.warning("native training kernels unavailable (%s); training uses the PyTorch versions", _first_line(e))
        _module = None
    return _module


def _see(notes: list[Path]) -> str:
    return f"see {' and '.join(map(str, notes))}; delete {'it' if len(notes) == 1 else 'them'} to retry"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
