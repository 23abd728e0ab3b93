"""Error types and the exit codes a pipeline can act on.

Pipelines (Nextflow, Snakemake) decide whether to retry from the exit code alone, so each failure class maps
to one documented code. nf-core retries 130-145 and 104 by default; out-of-resources therefore uses 140.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1        # a bug: please report it
EXIT_USAGE = 2           # bad command line (Typer/Click's own code)
EXIT_BAD_INPUT = 3       # invalid FASTA, annotation file, or incompatible SAE/PLM pairing
EXIT_MISSING_WEIGHTS = 4  # model weights not found offline
EXIT_OUTPUT = 5          # cannot write an output: disk full, read-only, a path that is a directory, ...
EXIT_INTERRUPTED = 130   # SIGINT (Ctrl-C): 128 + 2, the shell convention
EXIT_BROKEN_PIPE = 141   # stdout closed by the reader (`| head`): 128 + SIGPIPE; nothing is printed
EXIT_TERMINATED = 143    # SIGTERM (a workflow engine cancelling the job): 128 + 15
EXIT_RESOURCES = 140     # out of memory or similar: retrying with more resources may succeed


class ProtsaeError(Exception):
    """Base class: an error we can explain to the user in one message."""

    exit_code = EXIT_INTERNAL


class InputError(ProtsaeError):
    """Bad user input: FASTA, annotations, options. The message names the file, protein and position."""

    exit_code = EXIT_BAD_INPUT


class CompatibilityError(InputError):
    """An SAE and a PLM (or hook/layer/d_model) that do not belong together."""


class MissingWeightsError(ProtsaeError):
    """Weights could not be found locally and cannot be downloaded."""

    exit_code = EXIT_MISSING_WEIGHTS


class OutputError(ProtsaeError):
    """An output could not be written: the message names the path and the operating system's reason.

    Separate from bugs (1) and bad input (3) because the fix is the machine's, not the data's: free space,
    permissions, another prefix. Pipelines should not retry it blindly on the same node.
    """

    exit_code = EXIT_OUTPUT


class ResourceError(ProtsaeError):
    """Ran out of memory (device or host) in a way a retry with more resources could fix."""

    exit_code = EXIT_RESOURCES
