"""Scoped silence for third-party libraries that print progress, log every step and warn about
their own internals while doing what we asked. Always around one call, never process-wide:
the user's own logging and warnings stay as they were."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def silenced(loggers: Sequence[str] = ("",), *, ignore_warnings: bool = False) -> Iterator[None]:
    """Raise the named loggers (default: the root logger) to ERROR, swallow stdout, and with
    `ignore_warnings` drop warnings, for the duration of the block."""
    targets = [logging.getLogger(name or None) for name in loggers]
    levels = [logger.level for logger in targets]
    for logger in targets:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            if ignore_warnings:
                warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(targets, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_transformers(*, progress: bool = False) -> Iterator[None]:
    """No weight-loading progress bar or import noise from transformers in our output; restored
    afterwards. `progress=False` also swallows what tqdm writes to stderr: the GGUF loader draws
    its own bar ("Converting and de-quantizing GGUF tensors"), which transformers' switch does
    not reach."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        # transformers imports torchao when it is installed, which logs the GPU kernels it
        # cannot load on this machine and torch's pytree deprecations: noise for our users.
        with silenced(("torchao", "torch.utils._pytree")), contextlib.ExitStack() as stack:
            if not progress:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def native_stderr_kept() -> Iterator[None]:
    """What native code writes to file descriptor 2 during the block (the PyTorch profiler's
    Kineto announces each start and stop there) kept aside, and shown only if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+b") as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            kept.seek(0)
            sys.stderr.write(kept.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
