"""models.native: the kernels load once per process, and a machine that can't build them trains
with the PyTorch versions instead of failing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from torch.utils._cpp_extension_versioner import ExtensionVersioner

from models import native
from models.fused import composition_transpose


def _fresh(monkeypatch):
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_tried", False)


class _TorchBuild:
    """torch's build function (torch.utils.cpp_extension.load) in one process, without the compiler:
    it writes the file torch writes, `name.so`, or `name_vN.so` where torch's in-process versioner
    renames a name already built with other sources or flags; appends its own flags to the caller's
    extra_ldflags as torch does; and raises `fails(extra_cflags)`'s error where that gives one."""

    def __init__(self, fails=lambda cflags: None):
        self.versions, self.fails, self.built = ExtensionVersioner(), fails, object()
        self.calls, self.compiled = [], []

    def __call__(self, name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        version = self.versions.bump_version_if_changed(name, sources, [extra_cflags, None, extra_ldflags, None],
                                                        build_directory, False, False, True, False)
        self.calls.append(list(extra_cflags))
        so = Path(build_directory) / f"{name}{f'_v{version}' if version else ''}.so"
        if not so.exists():
            extra_ldflags += ["-L/torch/lib", "-ltorch"]
            if error := self.fails(extra_cflags):
                raise RuntimeError(error)
            so.write_bytes(b"")
            self.compiled.append(so.name)
        return self.built


def _process(monkeypatch, fails=lambda cflags: None) -> _TorchBuild:
    """A new process: load() not tried yet, torch's versioner empty."""
    _fresh(monkeypatch)
    build = _TorchBuild(fails)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    return build


def _cache_in(monkeypatch, tmp_path):
    if native.isa() is None:
        pytest.skip("no AVX2: the kernels are never built here")
    monkeypatch.delenv("FEDKB_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "OPENMP", list(native.OPENMP))  # what an old load() appended to stays here


def test_turned_off_by_the_environment(monkeypatch):
    _fresh(monkeypatch)
    monkeypatch.setenv("FEDKB_NATIVE", "0")
    assert native.load() is None and native.loaded() is None


def test_a_failed_build_is_logged_and_falls_back(monkeypatch, tmp_path, caplog):
    _fresh(monkeypatch)
    monkeypatch.delenv("FEDKB_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def no_compiler(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'fedkb_native': c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="models.native"):
        assert native.load() is None
        assert native.load() is None  # tried once per process, not once per call
    if calls:  # an AVX2 machine tried to build (with OpenMP, then without), into the cache under XDG_CACHE_HOME
        assert len(calls) == 2 and all(c["build_directory"].startswith(str(tmp_path)) for c in calls)
        assert "-fopenmp" in calls[0]["extra_cflags"] and "-fopenmp" not in calls[1]["extra_cflags"]
        assert "command not found" in caplog.text and "PyTorch versions" in caplog.text
    assert native.loaded() is None


def test_a_compiler_without_openmp_builds_the_kernels_for_one_thread(monkeypatch, tmp_path, capsys):
    """-fopenmp failing (a compiler without OpenMP) builds without it, and later processes load that
    build instead of trying OpenMP again.  The two builds have names of their own: under one name torch
    wrote the second as `fedkb_native_v1.so`, and the next process, not finding `fedkb_native.so`,
    compiled it again (~1 min) without a word."""
    _cache_in(monkeypatch, tmp_path)
    no_openmp = lambda cflags: "-fopenmp" in cflags and "c++: error: unsupported option '-fopenmp'"  # noqa: E731
    first = _process(monkeypatch, no_openmp)
    before = native.build_dir()
    assert native.will_compile()
    assert native.load() is first.built and len(first.calls) == 2 and first.compiled == ["fedkb_native_1t.so"]
    assert native.build_dir() == before  # torch's flags appended to a list of load()'s own, not to OPENMP
    assert capsys.readouterr().err.count("compiling") == 1  # once per load()
    for _ in range(2):  # the next processes (a parallel engine's workers)
        later = _process(monkeypatch, no_openmp)
        assert not native.will_compile()
        assert native.load() is later.built and later.compiled == [] and len(later.calls) == 1
        assert "-fopenmp" not in later.calls[0] and "compiling" not in capsys.readouterr().err


def test_a_failed_build_is_not_tried_again_until_its_note_is_deleted(monkeypatch, tmp_path, capsys, caplog):
    """A machine that cannot compile tried both builds in every process, announcing each (and the live
    screen a 1-minute compile at each run); now a failed build leaves a note in its folder, which
    will_compile() and load() honour until it is deleted, or the compiler changes."""
    _cache_in(monkeypatch, tmp_path)
    monkeypatch.delenv("CXX", raising=False)
    first = _process(monkeypatch, lambda cflags: "Error building extension: fatal error: Python.h: No such file or directory")
    with caplog.at_level(logging.INFO, logger="models.native"):
        assert native.load() is None and len(first.calls) == 2
    notes = [native.build_dir(openmp) / native.FAILED for openmp in (True, False)]
    assert all(n.exists() and "Python.h" in n.read_text() for n in notes)
    assert capsys.readouterr().err.count("compiling") == 1 and f"{notes[0]} and {notes[1]}; delete them to retry" in caplog.text
    caplog.clear()
    later = _process(monkeypatch, first.fails)  # the next process
    assert not native.will_compile()
    with caplog.at_level(logging.WARNING, logger="models.native"):
        assert native.load() is None and later.calls == []
    assert "compiling" not in capsys.readouterr().err and "failed here before" in caplog.text and "delete them to retry" in caplog.text
    _fresh(monkeypatch)
    monkeypatch.setenv("CXX", "/opt/another/g++")  # another compiler: tried again
    assert native.will_compile()
    monkeypatch.delenv("CXX")
    assert not native.will_compile()
    for n in notes:
        n.unlink()
    assert native.will_compile()
    again = _process(monkeypatch)  # deleted: built, and a note left by another compiler goes
    native.build_dir().joinpath(native.FAILED).write_text("compiler: /opt/another/g++\nerror\n")
    assert native.load() is again.built and again.compiled == ["fedkb_native_omp.so"]
    assert not native.build_dir().joinpath(native.FAILED).exists()


def _read_only(monkeypatch, cache):
    """The cache as on a read-only file system: no file in it can be opened for writing."""
    real_open = open

    def refusing(path, mode="r", *args, **kwargs):
        if Path(path).is_relative_to(cache) and any(c in mode for c in "wa+"):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(native, "open", refusing, raising=False)


def test_a_complete_build_in_a_read_only_cache_is_loaded_as_it_is(monkeypatch, tmp_path, capsys):
    """A prebuilt cache that cannot be written (an image's, a read-only $HOME): its build is imported
    as it is, where the lock file's error was taken for "no OpenMP" and the one-thread build was
    "compiled" into a folder that cannot exist."""
    mod = native.load()
    if mod is None:
        pytest.skip("the native kernels could not be built on this machine")
    _cache_in(monkeypatch, tmp_path)
    where = native.build_dir()
    where.mkdir(parents=True)
    (where / "fedkb_native_omp.so").write_bytes(Path(mod.__file__).read_bytes())
    _read_only(monkeypatch, tmp_path)
    build = _process(monkeypatch)
    assert not native.will_compile()
    got = native.load()
    assert build.calls == [] and "compiling" not in capsys.readouterr().err
    assert got is not None and Path(got.__spec__.origin) == where / "fedkb_native_omp.so"
    h, emb, bias = torch.randn(3, 16), torch.randn(5, 16), torch.randn(5)
    assert torch.equal(got.tied_softmax_xent(h, emb, bias, torch.tensor([0, 4, 2]), 1 / 3)[1],
                       mod.tied_softmax_xent(h, emb, bias, torch.tensor([0, 4, 2]), 1 / 3)[1])


def test_a_read_only_cache_without_the_build_says_where_and_what_to_do(monkeypatch, tmp_path, capsys, caplog):
    _cache_in(monkeypatch, tmp_path)
    where = native.build_dir()
    where.mkdir(parents=True)
    _read_only(monkeypatch, tmp_path)
    build = _process(monkeypatch)
    with caplog.at_level(logging.INFO, logger="models.native"):
        assert native.load() is None
    assert build.calls == [] and "compiling" not in capsys.readouterr().err and "no OpenMP" not in caplog.text
    assert f"{where} cannot be written" in caplog.text and "XDG_CACHE_HOME" in caplog.text


def test_the_build_folder_follows_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native.build_dir()
    assert first.parent == tmp_path / "fedkb" / "native"
    src = tmp_path / "native.cpp"
    src.write_text(native.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", src)
    assert native.build_dir() != first  # an edited source never loads a stale build


@pytest.mark.parametrize("cpu, env, want", [("AVX512", None, "AVX512"), ("AVX512", "avx2", "AVX2"), ("AVX2", None, "AVX2"),
                                             ("AVX2", "avx2", "AVX2"), ("DEFAULT", None, None), ("DEFAULT", "avx2", None)])
def test_the_build_targets_the_widest_vectors_torch_uses(monkeypatch, tmp_path, cpu, env, want):
    """AVX-512 where torch runs it (FEDKB_NATIVE=avx2 asks for AVX2), AVX2 else, nothing on other CPUs;
    each instruction set has a build folder of its own, so a shared cache never loads the wrong one."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cpu)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("FEDKB_NATIVE", raising=False)
    if env:
        monkeypatch.setenv("FEDKB_NATIVE", env)
    assert native.isa() == want
    if want:
        assert "-DCPU_CAPABILITY=" + want in native.FLAGS[want]
    folders = set()
    for other in ("AVX512", "AVX2"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda other=other: other)
        monkeypatch.delenv("FEDKB_NATIVE", raising=False)
        folders.add(native.build_dir())
    assert len(folders) == 2


def test_a_build_killed_midway_does_not_make_the_next_one_wait_forever(monkeypatch, tmp_path, caplog):
    """torch's FileBaton (`lock` in the build folder) outlives a build killed with kill -9, and every
    later load waited on it forever; the build now runs under a flock that dies with its holder, and
    removes a baton it finds.  The build compiles a copy of the source inside the folder, so two
    checkouts sharing the cache build the same command (their own paths rebuilt it at each switch)."""
    if native.isa() is None:
        pytest.skip("no AVX2: the kernels are never built here")
    import fcntl

    _fresh(monkeypatch)
    monkeypatch.delenv("FEDKB_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    where = native.build_dir()
    where.mkdir(parents=True)
    (where / "lock").write_bytes(b"")  # what a killed build leaves
    seen, built = [], object()

    def fake_build(name, sources, **kwargs):
        with open(where / "fedkb.lock") as f:  # held by load() for the whole build
            with pytest.raises(BlockingIOError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append((sources, (where / "lock").exists()))
        (where / f"{name}.so").write_bytes(b"")  # the file torch writes
        return built

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_build)
    with caplog.at_level(logging.WARNING, logger="models.native"):
        assert native.load() is built
    assert seen == [([str(where / "native.cpp")], False)] and "left behind by a build that was killed" in caplog.text
    assert (where / "native.cpp").read_bytes() == native.SOURCE.read_bytes()


def test_will_compile_only_before_a_first_build(monkeypatch, tmp_path):
    _fresh(monkeypatch)
    monkeypatch.delenv("FEDKB_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.will_compile() == (native.isa() is not None)  # nothing cached under this cache folder
    native.build_dir().mkdir(parents=True)
    (native.build_dir() / "fedkb_native.so").write_bytes(b"")  # another version's build, under another name
    assert native.will_compile() == (native.isa() is not None)
    (native.build_dir() / "fedkb_native_omp.so").write_bytes(b"")
    assert not native.will_compile()  # cached: load() only imports it
    monkeypatch.setattr(native, "_tried", True)
    assert not native.will_compile()


def test_the_composition_backward_rejects_row_pointers_past_its_columns():
    """Row pointers that run past the column indices would read out of bounds: an error instead."""
    mod = native.load()
    if mod is None:
        pytest.skip("the native kernels could not be built on this machine")
    g, gb = torch.zeros(3, 2), torch.zeros(3)
    col, val = torch.tensor([0, 2], dtype=torch.long), torch.ones(2)
    mod.compose_backward(torch.tensor([0, 1, 2]), col, val, g, gb)  # valid: two pieces, one word each
    for crow in ([0, 3, 2], [0, 1, 5], [1, 1, 2]):
        with pytest.raises(RuntimeError, match="row pointers"):
            mod.compose_backward(torch.tensor(crow), col, val, g, gb)
    for bad in ([0, 3], [-1, 0]):
        with pytest.raises(RuntimeError, match="out of range"):
            mod.compose_backward(torch.tensor([0, 1, 2]), torch.tensor(bad), val, g, gb)


def test_the_composition_backward_gives_zeros_to_pieces_no_word_uses():
    """Its output is not zero-filled first: a piece with no word gets its zeros written, the others
    the sum over their words, whatever the memory held before."""
    mod = native.load()
    if mod is None:
        pytest.skip("the native kernels could not be built on this machine")
    g, gb = torch.arange(48.0).view(3, 16), torch.tensor([1.0, 2.0, 3.0])
    for _ in range(3):  # reuse freed buffers that held other numbers
        gp, gpb = mod.compose_backward(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 2]), torch.tensor([0.5, 2.0]), g, gb)
        assert torch.equal(gp[0], torch.zeros(16)) and torch.equal(gp[2], torch.zeros(16))
        assert torch.equal(gp[1], 0.5 * g[0] + 2.0 * g[2]) and torch.equal(gpb, torch.tensor([0.0, 6.5, 0.0]))
        torch.full((3, 16), 7.0)  # dirty a freed block


def test_the_kernels_reject_indices_outside_their_tables():
    mod = native.load()
    if mod is None:
        pytest.skip("the native kernels could not be built on this machine")
    pe, pb, res, wb = torch.randn(4, 16), torch.randn(4), torch.randn(2, 16), torch.randn(2)
    mod.compose_forward(torch.tensor([0, 3, 1]), torch.tensor([0, 2]), pe, pb, res, wb, 2)  # valid
    with pytest.raises(RuntimeError, match="out of range"):
        mod.compose_forward(torch.tensor([0, 4, 1]), torch.tensor([0, 2]), pe, pb, res, wb, 2)
    for offsets in ([0, 0], [1, 2], [0, 3]):  # a word without pieces, not from 0, past the pieces
        with pytest.raises(RuntimeError, match="at least one piece"):
            mod.compose_forward(torch.tensor([0, 3, 1]), torch.tensor(offsets), pe, pb, res, wb, 2)
    h, emb, bias = torch.randn(3, 16), torch.randn(5, 16), torch.randn(5)
    mod.tied_softmax_xent(h, emb, bias, torch.tensor([0, 4, 2]), 1 / 3)  # valid
    for targets in ([0, 5, 2], [0, -1, 2]):
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            mod.tied_softmax_xent(h, emb, bias, torch.tensor(targets), 1 / 3)


@pytest.mark.parametrize("d", [7, 16, 96, 100])  # partial vectors; one to several groups of registers
def test_the_composition_equals_embedding_bags_table_bit_for_bit(d):
    mod = native.load()
    if mod is None:
        pytest.skip("the native kernels could not be built on this machine")
    g = torch.Generator().manual_seed(d)
    counts = torch.randint(1, 8, (50,), generator=g)  # 1..7 pieces: divisions and powers of two
    pieces = torch.randint(0, 30, (int(counts.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
    pe, pb, res, wb = (torch.randn(30, d, generator=g), torch.randn(30, generator=g), torch.randn(40, d, generator=g),
                       torch.randn(40, generator=g))
    emb, bias = mod.compose_forward(pieces, offsets, pe, pb, res, wb, 40)  # the last 10 words have no residual
    want = torch.nn.functional.embedding_bag(pieces, pe, offsets, mode="mean")
    want_b = torch.nn.functional.embedding_bag(pieces, pb.unsqueeze(1), offsets, mode="mean").squeeze(1)
    assert torch.equal(emb[:40], want[:40] + res) and torch.equal(emb[40:], want[40:])
    assert torch.equal(bias[:40], want_b[:40] + wb) and torch.equal(bias[40:], want_b[40:])


def test_the_kernels_give_the_same_bits_on_any_number_of_threads():
    """Built with OpenMP, the kernels split their work over torch's threads (the sequential engine
    uses every core); each output is computed in a fixed order whatever the split, and clipping's
    norm sums fixed blocks in order.  (The output layer's kernel: tests/test_models_fused.py.)"""
    mod = native.load()
    if mod is None:
        pytest.skip("the native kernels could not be built on this machine")
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    T, B, d, H, V = 6, 8, 32, 128, 2100  # 16 panels of gates, 2,100 words
    xs, w_ih, b, w_hh, w_hr, h0, c0 = r(T, B, d), r(4 * H, d) * 0.1, r(4 * H), r(4 * H, d) * 0.1, r(d, H) * 0.1, r(B, d), r(B, H)
    emb, bias = r(V, d), r(V)
    counts = torch.randint(1, 5, (V,), generator=g)
    pieces, offsets = torch.randint(0, 300, (int(counts.sum()),), generator=g), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]])
    pe, pb = r(300, d), r(300)
    st = composition_transpose(pieces, offsets, 300)  # S^T as CSR, as the training step passes it
    big = [r(70_000), r(300, d)]

    def run():
        fwd = mod.lstm_forward(xs, w_ih, b, w_hh, w_hr, h0, c0)
        acts, cs, tcs, hfs, hs = fwd
        bwd = mod.lstm_backward(acts, cs, tcs, hs[1:].clone(), w_hh, w_hr, torch.zeros(B, d), torch.zeros(B, H))
        comp = mod.compose_forward(pieces, offsets, pe, pb, emb, bias, V)
        comp_b = mod.compose_backward(st.crow_indices(), st.col_indices(), st.values(), emb, bias)
        params = [p.clone() for p in big]
        norm = mod.clip_sgd_(params, [p * 0.5 for p in big], 1.0, 0.1)
        return [*fwd, *bwd, *comp, *comp_b, *params, torch.tensor(norm)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
