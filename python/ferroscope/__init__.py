"""Name and label a Python process for the Ferroscope agent that profiles it.

Ferroscope profiles every CPython process on a host from the kernel, with
no code change. This module is the optional way for a process to choose
the application name and labels its profiles carry, and to end its
profiling, in the style of the Blackfire continuous profiler:

    from ferroscope import Profiler

    profiler = Profiler(application_name="my-python-app", labels={"my-extra-label": "data"})
    profiler.start()
    foo()
    with profiler.labels(endpoint="/checkout"):
        checkout()  # its samples carry endpoint=/checkout
    profiler.stop()

``labels()`` costs a dictionary lookup and a write to a per-thread slot
whose address the agent gave the kernel, which reads it with each sample;
the first use on a thread, and each new set of labels, cost one round trip
to the agent.

It talks to the agent over its local control socket
(``/run/ferroscope/control.sock``, or ``$FERROSCOPE_SOCKET``). When no agent
runs, ``start()`` starts one for this process alone if it can: the
``ferroscope`` binary (``$FERROSCOPE_BIN``, the one the wheel installed, or
on ``PATH``) and root; that agent uses ``period`` and ``upload_timeout``, writes to
``$FERROSCOPE_OUTPUT_DIR`` (default ``./profiles``) and stops with
``stop()``. Otherwise ``start()`` warns, says what to do, and the program
goes on, unless ``required=True``.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import threading
import time
import warnings
from typing import Dict, FrozenSet, Iterator, Mapping, Optional, Tuple

__all__ = ["Profiler", "AgentUnavailable"]

DEFAULT_SOCKET = "/run/ferroscope/control.sock"
# A call never holds the program up longer than this.
_TIMEOUT_SECONDS = 2.0


class AgentUnavailable(RuntimeError):
    """No Ferroscope agent answered on the control socket."""


class Profiler:
    """Profiling of this process under an application name and labels.

    Every ``period`` seconds the profile of this process is shipped, each
    upload given ``upload_timeout`` seconds.
    """

    def __init__(
        self,
        application_name: Optional[str] = None,
        period: float = 45,
        upload_timeout: float = 10,
        labels: Optional[Mapping[str, str]] = None,
        socket_path: Optional[str] = None,
        required: bool = False,
    ) -> None:
        self.application_name = application_name
        self.period = period
        self.upload_timeout = upload_timeout
        # The process's own labels; `labels()` is for blocks of code.
        self.process_labels: Dict[str, str] = {str(key): str(value) for key, value in (labels or {}).items()}
        self.socket_path = socket_path or os.environ.get("FERROSCOPE_SOCKET", DEFAULT_SOCKET)
        self.required = required
        self._lock = threading.Lock()
        self._started = False
        self._fork_hook = False
        self._own_agent: Optional[subprocess.Popen] = None
        self._reset_labels()

    def _reset_labels(self) -> None:
        # Per thread: the slot the kernel reads, and the labels in force.
        self._local = threading.local()
        # Label sets the agent knows, by content.
        self._set_ids: Dict[FrozenSet[Tuple[str, str]], int] = {}
        self._agent_missing = False

    def start(self) -> bool:
        """Profile this process under ``application_name`` and ``labels``,
        and the children it forks from now on, until ``stop()``.

        Returns whether the agent took it."""
        self._started = True
        if not os.path.exists(self.socket_path) and self._own_agent is None:
            self._start_own_agent()
        if not self._fork_hook:
            # The agent knows processes by pid: a child registers itself.
            os.register_at_fork(after_in_child=self._after_fork)
            self._fork_hook = True
        return self._ask(
            {
                "op": "start",
                "application_name": self.application_name,
                "labels": self.process_labels,
                "period": self.period,
                "upload_timeout": self.upload_timeout,
            }
        )

    def stop(self) -> bool:
        """End the profiling of this process; what its current period holds
        is shipped now. Returns whether the agent took it."""
        self._started = False
        stopped = self._ask({"op": "stop"})
        if self._own_agent is not None:
            # It ships what it holds as it exits.
            self._own_agent.terminate()
            self._own_agent.wait(timeout=self.upload_timeout + 5)
            self._own_agent = None
        return stopped

    def _start_own_agent(self) -> None:
        """Starts an agent for this process alone, if the binary is there
        and this process may load eBPF programs; else leaves it to
        ``start()`` to warn."""
        binary = os.environ.get("FERROSCOPE_BIN") or _bundled_binary() or shutil.which("ferroscope")
        if binary is None or os.geteuid() != 0:
            return
        self.socket_path = os.path.join(tempfile.mkdtemp(prefix="ferroscope-"), "control.sock")
        command = [
            binary, "agent", "--pid", str(os.getpid()),
            "--period", f"{self.period}s", "--upload-timeout", f"{self.upload_timeout}s",
            "--control-socket", self.socket_path,
            "--output-dir", os.environ.get("FERROSCOPE_OUTPUT_DIR", "profiles"),
        ]
        agent = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Loading its programs takes a moment; it listens once it samples.
        deadline = time.monotonic() + 5
        while not os.path.exists(self.socket_path) and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if os.path.exists(self.socket_path):
            self._own_agent = agent
        else:
            agent.kill()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        # Another process: other thread ids, and label sets it must tell anew.
        self._reset_labels()
        if self._started:
            self.start()

    @contextlib.contextmanager
    def labels(self, **labels: str) -> Iterator[None]:
        """Label the samples of this thread inside the block, e.g.
        ``with profiler.labels(endpoint="/checkout"):``. Blocks nest: inner
        labels add to (and override) outer ones."""
        slot = self._thread_slot()
        outer: Dict[str, str] = getattr(self._local, "labels", {})
        merged = {**outer, **{str(key): str(value) for key, value in labels.items()}}
        previous = slot.value if slot is not None else 0
        if slot is not None:
            slot.value = self._label_set_id(merged)
        self._local.labels = merged
        try:
            yield
        finally:
            self._local.labels = outer
            if slot is not None:
                slot.value = previous

    def _thread_slot(self) -> Optional[ctypes.c_uint64]:
        """This thread's slot, told to the agent on first use; None
        without an agent."""
        slot = getattr(self._local, "slot", None)
        if slot is None and not self._agent_missing:
            slot = ctypes.c_uint64(0)
            request = {"op": "thread", "tid": threading.get_native_id(), "address": ctypes.addressof(slot)}
            if self._ask(request):
                self._local.slot = slot
            else:
                self._agent_missing = True
                slot = None
        return slot

    def _label_set_id(self, labels: Dict[str, str]) -> int:
        key = frozenset(labels.items())
        with self._lock:
            known = self._set_ids.get(key)
        if known is not None:
            return known
        label_set = len(self._set_ids) + 1
        try:
            if not self._ask({"op": "label_set", "id": label_set, "labels": labels}):
                return 0
        except ValueError as refusal:
            # Past the agent's bounds (too many label sets, a label too long): the
            # block runs all the same, its samples without these labels.
            warnings.warn(f"{refusal}: these samples go without the labels {labels}", RuntimeWarning, stacklevel=4)
            label_set = 0
        with self._lock:
            self._set_ids[key] = label_set
        return label_set

    def _ask(self, request: dict) -> bool:
        with self._lock:
            try:
                answer = _request(self.socket_path, request)
            except OSError as error:
                message = (
                    f"ferroscope: no agent on {self.socket_path} ({error}): run `ferroscope agent` on the host "
                    "(as root, or with CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE), or run this program as root "
                    "with the ferroscope binary on PATH or in $FERROSCOPE_BIN"
                )
                if self.required:
                    raise AgentUnavailable(message) from error
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                return False
        if not answer.get("ok"):
            raise ValueError(f"ferroscope: the agent refused: {answer.get('error')}")
        return True


def _bundled_binary() -> Optional[str]:
    """The agent the wheel installed beside this package's environment."""
    path = os.path.join(sysconfig.get_path("scripts"), "ferroscope")
    return path if os.access(path, os.X_OK) else None


def _request(path: str, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(_TIMEOUT_SECONDS)
        connection.connect(path)
        connection.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            reply += chunk
    return json.loads(reply)
