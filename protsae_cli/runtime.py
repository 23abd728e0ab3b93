"""What every command needs before and after its own work, written once: the device, the SAE with its PLM,
the proteins, and the exit code of whatever ended the run.

Why one module: these steps used to be copied into annotate, steer, eval, calibrate and train, and the copies
drifted (only two fell back to the PLM an SAE records; eval refused duplicate ids, calibrate dropped identical
ones, train did neither). The rules now live here and are documented in README.md ("Inputs" and "Exit codes").

Import-light at module level (standard library only): the CLI imports it before any command runs, and
`protsae --help` must not pull in torch.
"""

from __future__ import annotations

import errno
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protsae_cli.errors import CompatibilityError, InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from protsae_cli.io.fasta import ProteinRecord
    from protsae_cli.plm.esm_forward import HookPoint
    from protsae_cli.plm.loading import LoadedPLM
    from protsae_cli.sae.config import SAEConfig

log = logging.getLogger("protsae.runtime")


# -- device -----------------------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    """`auto` -> the first CUDA GPU if there is one, else the CPU; an unavailable or malformed device is an input
    error (exit 3) that says what to pass instead, not torch's list of internal device types."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} requested but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise InputError(f"invalid --device {device!r} ({e})") from e


# -- the SAE and its PLM ----------------------------------------------------------------------------------

@dataclass
class LoadedModels:
    """An SAE, the PLM it reads, and the hook between them, checked to belong together."""

    sae: Any
    """The SAE module (`protsae_cli.sae.topk.TopKSAE` or a subclass); its `cfg` is the SAE's config."""
    sae_path: str
    """Where the SAE was loaded from (the bundled default SAE's directory when none was given)."""
    sae_sha256: str
    """sha256 of the SAE's weights file: recorded in every output's provenance."""
    plm: LoadedPLM
    """The protein LM, with the name and checksum the pairing check compared."""
    hook: HookPoint
    """Where in the PLM the SAE reads its activations."""
    device: torch.device
    """Where the PLM and the SAE were placed."""


def open_sae(sae: str | None, device: str | torch.device = "cpu") -> tuple[Any, str, str]:
    """(module, weights sha256, path) of an SAE spec; None means the bundled default SAE."""
    from protsae_cli.models import default_sae_dir
    from protsae_cli.sae.checkpoint import load_sae

    path = sae if sae is not None else str(default_sae_dir())
    if sae is None and not Path(path).exists():
        raise InputError(f"no SAE given and the default SAE is not installed ({path}); pass --sae DIR")
    module, sha = load_sae(path, device)
    return module, sha, path


def plm_for_sae(cfg: SAEConfig, sae_path: str, model: str | None, device: torch.device,
                given_sae: bool = True) -> LoadedPLM:
    """The PLM an SAE pairs with: `model` when given, else the one the SAE records (a fair-esm / hub name,
    never a path: README.md, "No code from data files"), else the bundled stand-in (for the bundled SAE, which
    was trained on it)."""
    from protsae_cli.plm.loading import load_plm, recorded_plm_spec

    if model is None and given_sae:
        model = recorded_plm_spec(cfg.plm_name, f"{sae_path}/config.json")
    return load_plm(model, device)


def check_pairing(cfg: SAEConfig, plm: LoadedPLM, check_plm: bool = True) -> None:
    """Refuse an SAE read from a PLM it was not trained on (shape always; weights identity unless
    --no-check-plm). The weights digest is computed only when the file checksums differ."""
    check_compatible(cfg, plm.name, plm.sha256, plm.d_model, plm.num_layers, strict_checksum=check_plm,
                     plm_weights_sha256=lambda: plm.weights_sha256)


def check_compatible(cfg: SAEConfig, plm_name: str, plm_sha256: str, plm_d_model: int, plm_num_layers: int,
                     strict_checksum: bool = True,
                     plm_weights_sha256: str | Callable[[], str] | None = None) -> None:
    """Refuse an SAE trained on another PLM, width or depth; the message names both sides.

    Identity: the same weights file (sha256) passes at once. Another file passes when the SAE records the
    format-independent weights digest (`plm.digest`, written by `protsae train` since it existed) and the loaded
    PLM's digest equals it: a fair-esm .pt and a Hugging Face safetensors snapshot of one model. An SAE that
    records only a file checksum cannot be confirmed on another file and is refused, as before.
    `plm_weights_sha256` is the loaded PLM's digest, or a function computing it (called only when needed).
    """
    if cfg.d_model != plm_d_model:
        raise CompatibilityError(
            f"SAE expects d_model={cfg.d_model} (trained on {cfg.plm_name or 'unknown PLM'}) but PLM "
            f"{plm_name} has d_model={plm_d_model}")
    if not 1 <= cfg.layer <= plm_num_layers:
        raise CompatibilityError(
            f"SAE hooks layer {cfg.layer} but PLM {plm_name} has {plm_num_layers} layers")
    if not strict_checksum or (cfg.plm_sha256 and plm_sha256 and cfg.plm_sha256 == plm_sha256):
        return
    if cfg.plm_weights_sha256 and plm_weights_sha256 is not None:
        digest = plm_weights_sha256() if callable(plm_weights_sha256) else plm_weights_sha256
        if digest == cfg.plm_weights_sha256:
            log.info("PLM %s is another file than the SAE's %s but holds the same weights (weights sha256 %s...)",
                     plm_name, cfg.plm_name, digest[:12])
            return
        raise CompatibilityError(
            f"SAE was trained on PLM {cfg.plm_name} (weights sha256 {cfg.plm_weights_sha256[:12]}...) but the "
            f"loaded PLM {plm_name} holds other weights (weights sha256 {digest[:12]}..., file sha256 "
            f"{plm_sha256[:12]}...); pass --no-check-plm to override")
    if cfg.plm_sha256 and plm_sha256:
        from protsae_cli.plm.loading import canonical_esm2_name

        other_format = cfg.plm_name != plm_name and canonical_esm2_name(cfg.plm_name) == canonical_esm2_name(plm_name)
        raise CompatibilityError(
            f"SAE was trained on PLM {cfg.plm_name} (sha256 {cfg.plm_sha256[:12]}...) but the loaded PLM is "
            f"{plm_name} (sha256 {plm_sha256[:12]}...); pass --no-check-plm to override"
            + ("; both name one ESM-2 release, but a fair-esm .pt and a Hugging Face safetensors file have different "
               "checksums" if other_format else "")
            + "; this SAE records no format-independent weights digest (older protsae versions did not), so "
              "protsae cannot confirm that the two files hold the same weights (docs/MODELS.md §3)")


def load_sae_with_plm(sae: str | None, model: str | None, device: str | torch.device = "auto",
                      check_plm: bool = True) -> LoadedModels:
    """The one way commands load an SAE with its PLM: open the SAE, take the PLM it records unless told
    otherwise, check they belong together."""
    from protsae_cli.plm.esm_forward import HookPoint

    dev = resolve_device(device) if isinstance(device, str) else device
    module, sha, path = open_sae(sae, dev)
    cfg = module.cfg
    plm = plm_for_sae(cfg, path, model, dev, given_sae=sae is not None)
    check_pairing(cfg, plm, check_plm)
    return LoadedModels(module, path, sha, plm, HookPoint(cfg.hook_point, cfg.layer), dev)


# -- proteins ---------------------------------------------------------------------------------------------

@dataclass
class Proteins:
    """The valid proteins of one FASTA, with what was left out (evaluation reports record both)."""

    records: list[ProteinRecord]
    """Valid proteins in file order."""
    n_invalid: int = 0
    """Records skipped as invalid."""
    n_repeated: int = 0
    """Records dropped as repeats (same id and sequence as an earlier one)."""


def read_proteins(path: str, *, skip_invalid: bool = True, unique_ids: bool = False) -> Proteins:
    """All valid proteins of a FASTA, for commands that learn or measure over a collection (train, eval,
    calibrate, label).

    `skip_invalid`: invalid records are skipped with one warning naming the file, the count and the first
    error (annotate instead records them with status `invalid`, and steer refuses them: each protein it gets is
    a target). `unique_ids`: commands that match labels by id need unique ids; a repeated id with the same
    sequence is dropped with a warning, with a different sequence it is an input error naming both records.
    """
    from protsae_cli.io.fasta import ProteinRecord, read_fasta

    prots: list[ProteinRecord] = []
    invalid: list[Any] = []
    seen: dict[str, ProteinRecord] = {}
    dropped = 0
    for r in read_fasta(path, skip_invalid=skip_invalid):
        if not isinstance(r, ProteinRecord):
            invalid.append(r)
            continue
        if unique_ids:
            first = seen.get(r.id)
            if first is not None:
                if first.sequence.upper() != r.sequence.upper():
                    raise InputError(f"{path}: protein id {r.id!r} occurs twice with different sequences (records "
                                     f"{first.index + 1} and {r.index + 1}); labels are matched by id, so ids "
                                     "must be unique")
                dropped += 1
                continue
            seen[r.id] = r
        prots.append(r)
    if invalid:
        log.warning("%s: skipped %d invalid record%s (first: %s)", path, len(invalid),
                    "" if len(invalid) == 1 else "s", invalid[0].error)
    if dropped:
        log.warning("%s: dropped %d repeated record%s (same id and sequence as an earlier one)", path, dropped,
                    "" if dropped == 1 else "s")
    if not prots:
        raise InputError(f"{path}: no valid protein sequences")
    return Proteins(prots, len(invalid), dropped)


# -- how a run ends ---------------------------------------------------------------------------------------

class Terminated(SystemExit):
    """SIGTERM as an exception: it unwinds through the writers' abort paths like Ctrl-C does."""


def exit_on_signals() -> None:
    """Turn SIGTERM (a workflow engine cancelling the job) into SystemExit(143) and SIGINT into
    KeyboardInterrupt, both deferred while HDF5 is inside a write.

    Python's default for SIGTERM is to die without unwinding, which would leave writers' hidden temp files
    behind; as an exception, the writers' abort paths and the atexit clean-up run and the exit status is still
    128+15.
    """
    import signal

    from protsae_cli.io.atomic import raise_or_defer

    def _handler(signum: int, frame: object) -> None:
        # Deferred while HDF5 is inside a write (io.atomic.signals_deferred), raised right after it.
        raise_or_defer(Terminated(128 + signum))

    def _interrupt(signum: int, frame: object) -> None:
        raise_or_defer(KeyboardInterrupt())

    try:
        signal.signal(signal.SIGTERM, _handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the parent ignores it
            signal.signal(signal.SIGINT, _interrupt)
    except ValueError:  # not in the main thread (embedded use): leave the default
        pass


#: errno values that mean "this output cannot be written here" (the machine's problem, not a bug).
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EFBIG,
                 errno.EDQUOT, errno.EIO}


def is_out_of_memory(exc: BaseException) -> bool:
    """Device out-of-memory that escaped the per-batch fallbacks (e.g. while loading the model).

    Pipelines retry exit 140 with more resources, so these must not look like bugs (exit 1). Recognised by
    type name and message rather than `isinstance(torch.cuda.OutOfMemoryError)` so this module never imports
    torch, and so older torch versions' plain RuntimeErrors and cuBLAS/MPS variants are caught as well.
    """
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc)
        return any(s in msg for s in ("CUDA out of memory", "CUDA error: out of memory",
                                      "CUBLAS_STATUS_ALLOC_FAILED", "MPS backend out of memory",
                                      "HIP out of memory"))
    return False


def exit_status(exc: BaseException) -> tuple[int | None, str | None, bool]:
    """(exit code, one-line message or None, print the traceback?) for an exception leaving a command.

    The one place that maps failure classes to the exit codes documented in README.md (the CLI and the
    `--devices` workers both use it); None for a SystemExit that carries a message instead of a code (it is
    re-raised as it is).
    """
    from protsae_cli.errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OUTPUT,
                                    EXIT_RESOURCES, ProtsaeError)

    if isinstance(exc, Terminated):
        return exc.code, "protsae: terminated", False  # type: ignore[return-value]
    if isinstance(exc, SystemExit):
        # Typer turns Ctrl-C into Exit(130) and a closed stdout into exit 1; its usage errors are already
        # printed. Other codes pass through.
        if exc.code == EXIT_INTERRUPTED or isinstance(exc.__context__, KeyboardInterrupt):
            return EXIT_INTERRUPTED, "protsae: interrupted", False
        if isinstance(exc.__context__, BrokenPipeError):  # Click turns EPIPE into a bare exit 1
            return EXIT_BROKEN_PIPE, None, False
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0, None, False
        return None, None, False
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "protsae: interrupted", False
    if isinstance(exc, BrokenPipeError):  # the reader of our stdout went away (`| head`): not an error
        return EXIT_BROKEN_PIPE, None, False
    if isinstance(exc, ProtsaeError):
        return exc.exit_code, f"protsae: error: {exc}", False
    if isinstance(exc, MemoryError):
        return EXIT_RESOURCES, f"protsae: error: out of host memory ({exc})", False
    if is_out_of_memory(exc):
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return (EXIT_RESOURCES, f"protsae: error: out of GPU memory after all fallbacks ({first}); retry with "
                "more GPU memory or a smaller --toks-per-batch", False)
    if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return EXIT_OUTPUT, f"protsae: error: cannot write{where}: {exc.strerror or exc}", False
    return EXIT_INTERNAL, "protsae: internal error (a bug); please report it with the traceback above", True


def leave(code: int, message: str | None) -> None:
    """Print the message and exit; with os._exit when a worker thread is still running native code.

    A thread left inside libtorch or onnxruntime when the interpreter finalises aborts the whole process
    (`terminate called without an active exception`, exit 134) and loses the exit code; the writers' temp files
    are already removed by their abort paths by the time we get here, so skipping finalisation loses nothing.
    """
    import os
    import threading

    if message:
        try:
            print(message, file=sys.stderr)
        except (BrokenPipeError, OSError):
            pass
    if code == 141:
        _silence_stdout()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if others:
        from protsae_cli.io.atomic import remove_open_temps

        remove_open_temps()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of a closed pipe raises nothing."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
