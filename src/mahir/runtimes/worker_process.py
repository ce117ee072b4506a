"""A long-lived process in an environment of mahir's own, spoken to in lines of JSON: requests
on its standard input, answers on its standard output, each tagged with its request's id, so
callers on several threads share one process and each reads only its own answers.

The first line the process writes is {"ready": {...}} (or {"fatal": line}); then answers carry
an "id" and end with "done": true or an "error"; a {"state": {...}} line between them updates
what the process says of its engine now (`state`: its gauges). One reader thread routes each
answer to its request's queue, or hands it to the request's callback (`subscribe`: no thread
waits per request, which a server streaming many at once would wake for every token). When
the process dies (or writes {"fatal": ...}) every waiting caller gets a one-line
`RuntimeFailure` with the last line of the process's log, not a hang: callers wait on their
queue with a timeout, never by sleeping, and callbacks get None. Its standard error goes to a
log file, so a chatty library cannot fill a pipe nobody reads. `close` (also at exit, through
`weakref.finalize`) ends its input, waits for it, then stops its process group: nothing is
left running.

Imports errors and psutil (what the process holds); the process itself imports nothing of
mahir.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, cast

import psutil

from mahir.errors import RuntimeFailure

POLL_S = 1.0
"""How often a waiting caller checks that the process is still alive."""
Deliver = Callable[[dict[str, Any] | None], None]
"""Takes a request's answers in turn (None: the process ended)."""


class WorkerProcess:
    """One process answering JSON requests by id (see the module's docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        name: str,
        environment: Mapping[str, str],
        ready_timeout_s: float,
    ) -> None:
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"mahir-{name}-"))
        """Scratch space shared with the process (files too big for a line), removed on close."""
        self.log = self.folder / "worker.log"
        self._ids = itertools.count()
        self._waiting: dict[str, Deliver] = {}
        """Where each running request's answers go."""
        self._lock = threading.Lock()
        self._failure: str | None = None
        self.state: dict[str, Any] = {}
        """The last {"state": ...} the process wrote: its engine's gauges, as of then."""
        with self.log.open("w") as log:
            self._process = subprocess.Popen(
                list(command),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, **environment},
                start_new_session=True,  # its own process group: close stops its children too
            )
        self._stdin, self._stdout = (
            cast(IO[str], self._process.stdin),
            cast(IO[str], self._process.stdout),
        )
        self._writing = threading.Lock()
        self._stop = weakref.finalize(self, _stop, self._process, self.folder)
        self._first: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()
        self.ready = self._await_ready(ready_timeout_s)
        """What the process said about itself in its first line."""

    def request(self, message: dict[str, Any], *, timeout_s: float) -> Iterator[dict[str, Any]]:
        """Send `message` (its "id" added) and yield its answers until the one marked done;
        closing the iterator early sends {"op": "abort"} for it."""
        request = f"{self.name}-{next(self._ids)}"
        answers: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        with self._lock:
            self._waiting[request] = answers.put
        done = False
        try:
            self._send({**message, "id": request})
            while not done:
                answer = self._next(answers, timeout_s)
                done = bool(answer.get("done")) or "error" in answer
                if "error" in answer:  # the process refused it: nothing to abort
                    raise RuntimeFailure(f"{self.name}: {answer['error']}")
                yield answer
        finally:
            with self._lock:
                self._waiting.pop(request, None)
            if not done and self._failure is None:
                self._send({"op": "abort", "id": request})

    def subscribe(self, message: dict[str, Any], deliver: Deliver) -> Callable[[], None]:
        """Send `message` (its "id" added) and hand each of its answers to `deliver` on the
        reader's thread, up to the one marked done or an error, or None if the process ends
        first. Returns what abandons it: its answers stop and {"op": "abort"} goes out, unless
        it had ended (idempotent)."""
        request = f"{self.name}-{next(self._ids)}"

        def route(answer: dict[str, Any] | None) -> None:
            if answer is None or answer.get("done") or "error" in answer:
                with self._lock:
                    self._waiting.pop(request, None)
            deliver(answer)

        def abandon() -> None:
            with self._lock:
                running = self._waiting.pop(request, None) is not None
            if running and self._failure is None:
                with contextlib.suppress(RuntimeFailure):  # it stopped meanwhile: nothing runs
                    self._send({"op": "abort", "id": request})

        with self._lock:
            self._waiting[request] = route
        try:
            self._send({**message, "id": request})
        except RuntimeFailure:
            with self._lock:
                self._waiting.pop(request, None)
            raise
        return abandon

    @property
    def failure(self) -> str:
        """Why the process stopped answering, in one line."""
        return self._failure or f"{self.name} stopped"

    def close(self) -> None:
        """Stop the process and remove its scratch folder (again: nothing)."""
        self._stop()

    def memory_mb(self) -> float:
        """Resident memory of the process and its children, in MiB (0 once it has stopped)."""
        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(self._process.pid)
            for one in [process, *process.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += one.memory_info().rss
        return total / 2**20

    def has_loaded(self, library: str) -> bool:
        """Whether the process has a shared library whose file name starts with `library` in
        its memory (False once it has stopped, or where the system does not tell)."""
        with contextlib.suppress(psutil.Error, NotImplementedError, AttributeError):
            maps = psutil.Process(self._process.pid).memory_maps()
            return any(Path(m.path).name.startswith(library) for m in maps)
        return False

    def _await_ready(self, timeout_s: float) -> dict[str, Any]:
        try:
            first = self._next(self._first, timeout_s)
        except RuntimeFailure:
            self.close()
            raise
        return dict(first["ready"])

    def _next(
        self, answers: queue.SimpleQueue[dict[str, Any] | None], timeout_s: float
    ) -> dict[str, Any]:
        waited = 0.0
        while True:
            try:
                answer = answers.get(timeout=POLL_S)
            except queue.Empty:
                waited += POLL_S
                if self._failure is None and self._process.poll() is not None:
                    self._reader.join(timeout=POLL_S)  # the reader records why, from the log
                if self._failure is not None:
                    raise RuntimeFailure(self._failure) from None
                if waited >= timeout_s:
                    raise RuntimeFailure(
                        f"{self.name} gave no answer in {timeout_s:.0f} s (its log: {self.log}): "
                        "open the engine again"
                    ) from None
                continue
            if answer is None:
                raise RuntimeFailure(self.failure)
            return answer

    def _send(self, message: dict[str, Any]) -> None:
        try:
            with self._writing:
                self._stdin.write(json.dumps(message) + "\n")
                self._stdin.flush()
        except (BrokenPipeError, ValueError) as err:  # ValueError: closed
            raise RuntimeFailure(self._failure or f"{self.name} is no longer running") from err

    def _route(self, line: str) -> None:
        try:
            answer = json.loads(line)
        except ValueError:
            answer = {"fatal": f"wrote {line.strip()[:80]!r}, not an answer"}
        if "fatal" in answer:
            self._failure = f"{self.name} failed: {answer['fatal']}"
        elif "ready" in answer:
            self._first.put(answer)
        elif "state" in answer:
            self.state = answer["state"]
        else:
            with self._lock:
                deliver = self._waiting.get(answer.get("id", ""))
            if deliver is not None:
                deliver(answer)

    def _read(self) -> None:
        """Route each line to its request's queue; at the end, wake everyone with the reason."""
        with self._stdout:
            for line in self._stdout:
                self._route(line)
        status = self._process.wait()
        if self._failure is None:
            self._failure = f"{self.name} exited (status {status}): {_last_line(self.log)}"
        with self._lock:
            everyone = [self._first.put, *self._waiting.values()]
        for deliver in everyone:
            deliver(None)


def _stop(process: subprocess.Popen[str], folder: Path, grace_s: float = 30) -> None:
    """End the process's input (it finishes and exits), then stop what is left of its group."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):  # already broken: the process is gone
            process.stdin.close()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s / 3)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    _signal_group(process, signal.SIGKILL)  # children it left behind, if any
    shutil.rmtree(folder, ignore_errors=True)


def _signal_group(process: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is empty already
        os.killpg(process.pid, sig)


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    return next((line for line in reversed(lines) if line), "nothing logged")
