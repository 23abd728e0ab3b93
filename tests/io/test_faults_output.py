"""Output faults are I/O errors, not bugs (issue #12, item 5).

Disk full, a file size limit, a read-only directory, a prefix whose `.h5` is a directory, a parent that is a
file: exit 5 with one line naming the output path and the cause, nothing left behind, never "internal error"
and never a segfault (ENOSPC while writing HDF5 used to end in exit 139 after the message). Paths are checked
before the models load, so a bad -o fails in seconds; `-o d/` writes `d/<input stem>.*`.

The disk-full tests mount a 1 MiB tmpfs (root only, else skipped with the reason); the file-size-limit test
(RLIMIT_FSIZE: the kernel's own EFBIG) and the in-process fault injection run unprivileged everywhere.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from protsae_cli.errors import EXIT_OUTPUT, OutputError
from protsae_cli.io.results import ProteinResult
from protsae_cli.io.writers import prefix_for_directory, prepare_output_prefix
from protsae_cli.io.writers.h5 import H5Writer, _DiscardableFile

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}


def big_fasta(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(f">p{i} test protein\n" + "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY")
                                                          for _ in range(rng.randint(80, 300))) + "\n"
                            for i in range(n)))
    return path


def protsae(*args: str, preexec=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protsae_cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, preexec_fn=preexec)


def model_args(tiny_esm_path, tiny_sae_dir) -> list[str]:
    return ["--model", str(tiny_esm_path), "--sae", str(tiny_sae_dir), "--device", "cpu", "--no-progress"]


def assert_output_fault(p: subprocess.CompletedProcess, path: str, cause: str) -> None:
    assert p.returncode == EXIT_OUTPUT, (p.returncode, p.stderr[-2000:])
    last = p.stderr.strip().splitlines()[-1]
    assert path in last and cause in last, p.stderr[-2000:]
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr and "Fatal Python" not in p.stderr


@pytest.fixture()
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE and fault-injection tests cover this")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("formats", ["h5", "tsv", "gff3", "h5,tsv,gff3"])
def test_disk_full_is_exit_5_naming_the_path(tiny_tmpfs, tiny_esm_path, tiny_sae_dir, tmp_path, formats):
    fa = big_fasta(tmp_path / "in.fasta", n=400)
    p = protsae("annotate", str(fa), "-o", str(tiny_tmpfs / "run"), "--formats", formats, "--h5-dtype", "float32",
                *model_args(tiny_esm_path, tiny_sae_dir))
    assert_output_fault(p, str(tiny_tmpfs / "run."), "No space left on device")
    assert os.listdir(tiny_tmpfs) == [], "no temp or partial output may be left"


def test_file_size_limit_is_exit_5_unprivileged(tiny_esm_path, tiny_sae_dir, tmp_path):
    """RLIMIT_FSIZE makes the kernel fail writes past the limit with EFBIG, for any user."""
    fa = big_fasta(tmp_path / "in.fasta", n=300)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out"
    for formats in ("h5", "tsv"):
        p = protsae("annotate", str(fa), "-o", str(out / "run"), "--formats", formats, "--h5-dtype", "float32",
                    *model_args(tiny_esm_path, tiny_sae_dir), preexec=limit)
        assert_output_fault(p, str(out / f"run.{formats}"), "File too large")
        assert os.listdir(out) == [], formats


def result(i: int, rows: int = 300, k: int = 8, d_sae: int = 64) -> ProteinResult:
    rng = np.random.default_rng(i)
    idx = np.argsort(rng.random((rows, d_sae)), axis=1)[:, :k].astype(np.int64)
    return ProteinResult(index=i, id=f"p{i}", description="", sequence="A" * rows, status="ok", status_detail="",
                         idx=idx, val=rng.random((rows, k)).astype(np.float32), segments=[])


def test_hdf5_write_failure_is_a_named_oserror_and_the_process_exits_cleanly(tmp_path):
    """Fault injection in a child process: the n-th write fails with ENOSPC. The writer must raise an OSError
    naming the final path, leave no temp, and the interpreter must then exit normally (the old driver path
    crashed at exit with a segfault)."""
    code = f"""
import errno, os, sys
sys.path.insert(0, {str(REPO)!r})
from protsae_cli.io.writers import h5 as H
from tests.io.test_faults_output import result
real = H._DiscardableFile.write
calls = [0]
def failing(self, data):
    # The 4th and later writes hit a full disk, as the OS reports it to the sink's file.
    calls[0] += 1
    if calls[0] > 3 and not self.discard:
        class Full:
            def write(self_, b):
                raise OSError(errno.ENOSPC, "No space left on device")
        saved, self._f = self._f, Full()
        try:
            return real(self, data)
        finally:
            self._f = saved
    return real(self, data)
H._DiscardableFile.write = failing
w = H.H5Writer({str(tmp_path / 'x.h5')!r}, {{"format": "t"}}, [], 64, 8, flush_rows=500)
try:
    for i in range(50):
        w.write(result(i))
    w.close()
except OSError as e:
    print("RAISED", e.errno, e.filename)
print("LEFT", sorted(os.listdir({str(tmp_path)!r})))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"RAISED {errno.ENOSPC} {tmp_path / 'x.h5'}" in p.stdout, p.stdout + p.stderr
    assert "LEFT []" in p.stdout
    assert "Fatal Python" not in p.stderr and "Segmentation" not in p.stderr


def test_hdf5_written_through_the_file_object_reads_back(tmp_path):
    with H5Writer(tmp_path / "ok.h5", {"format": "t"}, [], 64, 8, flush_rows=200) as w:
        for i in range(5):
            w.write(result(i, rows=150))
    with h5py.File(tmp_path / "ok.h5") as f:
        assert f["codes/indptr"].shape == (751,) and f["proteins/index"][()].tolist() == [0, 1, 2, 3, 4]


def test_a_short_write_is_completed(tmp_path):
    """Unbuffered writes may be short; the sink must loop, not report the whole buffer as written."""
    sink = _DiscardableFile(tmp_path / ".t", tmp_path / "t")

    class Short:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            return self.f.write(bytes(b)[:3])

        def __getattr__(self, name):
            return getattr(self.f, name)

    sink._f = Short(sink._f)
    assert sink.write(b"0123456789") == 10
    sink.close()
    assert (tmp_path / ".t").read_bytes() == b"0123456789"


# ---------------------------------------------------------------------------------------------------------
# Paths checked before the models load
# ---------------------------------------------------------------------------------------------------------

def test_bad_output_paths_fail_before_the_models_load(tmp_path, small_fasta):
    """--model names a file that does not exist: if the output check did not come first, the error would be
    about the model (exit 4/3) instead of the output (exit 5)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken.h5").mkdir()
    missing_model = ["--model", str(tmp_path / "no_such_model.pt"), "--device", "cpu"]
    p = protsae("annotate", str(small_fasta), "-o", str(tmp_path / "afile" / "run"), *missing_model)
    assert_output_fault(p, str(tmp_path / "afile"), "is a file, not a directory")
    p = protsae("annotate", str(small_fasta), "-o", str(tmp_path / "taken"), *missing_model)
    assert_output_fault(p, str(tmp_path / "taken.h5"), "is a directory")
    p = protsae("merge", str(tmp_path / "afile" / "m"), str(small_fasta))
    assert p.returncode == 3 or p.returncode == EXIT_OUTPUT  # not an HDF5: the input check may come first
    assert "internal error" not in p.stderr


def test_read_only_directory(tmp_path, small_fasta):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root ignores permission bits: make the filesystem itself read-only
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
        mounted = r.returncode == 0
        if not mounted:
            pytest.skip("root, and cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o555)
    try:
        p = protsae("annotate", str(small_fasta), "-o", str(ro / "run"), "--model",
                    str(tmp_path / "no_such_model.pt"), "--device", "cpu")
        cause = "Read-only file system" if mounted else "Permission denied"
        assert_output_fault(p, str(ro), cause)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        else:
            ro.chmod(0o755)


def test_directory_prefix_writes_input_stem(tiny_esm_path, tiny_sae_dir, tmp_path, small_fasta):
    fa = tmp_path / "my proteins.fasta.gz"
    import gzip

    fa.write_bytes(gzip.compress(small_fasta.read_bytes()))
    for target in (str(tmp_path / "new_dir") + "/", str(tmp_path)):
        p = protsae("annotate", str(fa), "-o", target, *model_args(tiny_esm_path, tiny_sae_dir))
        assert p.returncode == 0, p.stderr
        d = Path(target)
        assert sorted(x.name for x in d.glob("my proteins.*") if x.suffix != ".gz") == \
            ["my proteins.gff3", "my proteins.h5", "my proteins.tsv"]
        assert not list(d.glob(".h5")) and not list(d.glob(".*.tmp-*"))


def test_directory_prefix_needs_a_named_input(tmp_path):
    with pytest.raises(OutputError, match="give a prefix such as"):
        prefix_for_directory(str(tmp_path), "-")
    fa = tmp_path / "x.faa"
    fa.write_text(">a\nMK\n")
    assert prefix_for_directory("out", str(fa)) == os.path.join("out", "x")
    assert prepare_output_prefix(str(tmp_path) + "/", ["tsv"], str(fa)) == os.path.join(str(tmp_path), "x")
    with pytest.raises(OutputError, match="empty"):
        prepare_output_prefix("", ["h5"])


@pytest.mark.parametrize("handlers", ["cli", "library"])
def test_a_signal_during_an_hdf5_write_unwinds_cleanly(tmp_path, handlers):
    """A signal that arrives while HDF5 is calling back into Python (the file-object driver) must not be
    raised inside HDF5: the CLI defers it to the end of the HDF5 call; for a library user (Python's default
    Ctrl-C handler) the file object shields HDF5 from it. Either way the exception unwinds, the temp is
    removed and the process exits without a crash."""
    sig = "SIGTERM" if handlers == "cli" else "SIGINT"
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
if {handlers!r} == "cli":
    from protsae_cli.runtime import exit_on_signals
    exit_on_signals()
from protsae_cli.io.writers import h5 as H
from tests.io.test_faults_output import result
calls = [0]
class SignallingFile:
    # The OS file under the sink: its 6th write raises the signal, so the handler runs inside a callback
    # that HDF5 made.
    def __init__(self, f):
        self.f = f
    def write(self, data):
        calls[0] += 1
        if calls[0] == 6:
            os.kill(os.getpid(), signal.{sig})
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
real_init = H._DiscardableFile.__init__
def init(self, tmp, final):
    real_init(self, tmp, final)
    self._f = SignallingFile(self._f)
H._DiscardableFile.__init__ = init
w = H.H5Writer({str(tmp_path / 'x.h5')!r}, {{"format": "t"}}, [], 64, 8, flush_rows=300)
try:
    for i in range(60):
        w.write(result(i))
    w.close()
    print("NOT INTERRUPTED")
except BaseException as e:
    print("UNWOUND", type(e).__name__, sorted(os.listdir({str(tmp_path)!r})), flush=True)
    raise
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert "UNWOUND" in p.stdout and "[]" in p.stdout, p.stdout + p.stderr[-3000:]
    # An uncaught KeyboardInterrupt ends Python by SIGINT itself (-2), as the shell expects.
    assert p.returncode == (143 if handlers == "cli" else -signal.SIGINT), (p.returncode, p.stderr[-3000:])
    assert "Fatal Python" not in p.stderr and "Segmentation" not in p.stderr


def test_default_hdf5_codes_are_readable_by_scipy_and_anndata(tiny_esm_path, tiny_sae_dir, tmp_path, small_fasta):
    """AnnData's read_elem (and scipy.sparse) refuse float16 CSR data, so the default stores float32."""
    p = protsae("annotate", str(small_fasta), "-o", str(tmp_path / "run"), "--formats", "h5",
                *model_args(tiny_esm_path, tiny_sae_dir))
    assert p.returncode == 0, p.stderr
    import scipy.sparse as sp

    with h5py.File(tmp_path / "run.h5") as f:
        c = f["codes"]
        assert c["data"].dtype == np.float32
        m = sp.csr_matrix((c["data"][()], c["indices"][()], c["indptr"][()]), shape=tuple(c.attrs["shape"]))
        assert (m.getnnz(axis=1) <= 32).all() and m.sum() > 0  # arithmetic works: a supported dtype
        try:
            from anndata.io import read_elem
        except ImportError:
            return
        assert read_elem(c).shape == m.shape


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, tiny_sae_dir, umask):
    """Weights used to be 0600 whatever the umask (safetensors creates files private), so a lab's shared
    model directory was unreadable to the group; outputs must follow the umask like any Unix tool's."""
    from protsae_cli.sae.checkpoint import load_sae, save_sae

    sae, _ = load_sae(tiny_sae_dir)
    old = os.umask(umask)
    try:
        out = save_sae(sae, tmp_path / "sae")
        with H5Writer(tmp_path / "x.h5", {"format": "t"}, [], 64, 8) as w:
            w.write(result(0, rows=5))
    finally:
        os.umask(old)
    for p in (out / "sae.safetensors", out / "config.json", tmp_path / "x.h5"):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask, (p, oct(os.stat(p).st_mode))


def test_directory_prefix_is_expanded_once(tiny_esm_path, tiny_sae_dir, tmp_path, small_fasta):
    """`-o dd/` with a directory `dd/small/` already there must write dd/small.h5, not dd/small/small.h5."""
    (tmp_path / "dd" / "small").mkdir(parents=True)
    p = protsae("annotate", str(small_fasta), "-o", str(tmp_path / "dd") + "/", "--formats", "h5",
                *model_args(tiny_esm_path, tiny_sae_dir))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "dd" / "small.h5").is_file() and not list((tmp_path / "dd" / "small").iterdir())


def test_a_name_too_long_is_an_output_error(tmp_path, small_fasta):
    p = protsae("annotate", str(small_fasta), "-o", str(tmp_path / ("x" * 300)), "--model",
                str(tmp_path / "no_such_model.pt"), "--device", "cpu")
    assert_output_fault(p, "x" * 50, "File name too long")
