"""Name and label a Python process for the Ferroscope agent that profiles it.

Ferroscope profiles every CPython process on a host from the kernel, with
no code change. This module is the optional way for a process to choose
the application name and labels its profiles carry, and to end its
profiling, in the style of the Blackfire continuous profiler:

    from ferroscope import Profiler

    profiler = Profiler(application_name="my-python-app", labels={"my-extra-label": "data"})
    profiler.start()
    foo()
    profiler.stop()

It talks to the agent over its local control socket
(``/run/ferroscope/control.sock``, or ``$FERROSCOPE_SOCKET``). Without an
agent, ``start()`` warns and the program goes on, unless ``required=True``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from typing import Dict, Mapping, Optional

__all__ = ["Profiler", "AgentUnavailable"]

DEFAULT_SOCKET = "/run/ferroscope/control.sock"
# A call never holds the program up longer than this.
_TIMEOUT_SECONDS = 2.0


class AgentUnavailable(RuntimeError):
    """No Ferroscope agent answered on the control socket."""


class Profiler:
    """Profiling of this process under an application name and labels.

    ``period`` and ``upload_timeout`` (seconds) are kept for compatibility
    with the Blackfire profiler's API; the agent's own settings apply.
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
        self.labels: Dict[str, str] = {str(key): str(value) for key, value in (labels or {}).items()}
        self.socket_path = socket_path or os.environ.get("FERROSCOPE_SOCKET", DEFAULT_SOCKET)
        self.required = required
        self._lock = threading.Lock()
        self._started = False
        self._fork_hook = False

    def start(self) -> bool:
        """Profile this process under ``application_name`` and ``labels``,
        and the children it forks from now on, until ``stop()``.

        Returns whether the agent took it."""
        self._started = True
        if not self._fork_hook:
            # The agent knows processes by pid: a child registers itself.
            os.register_at_fork(after_in_child=self._after_fork)
            self._fork_hook = True
        return self._ask({"op": "start", "application_name": self.application_name, "labels": self.labels})

    def stop(self) -> bool:
        """End the profiling of this process; what its current period holds
        is shipped now. Returns whether the agent took it."""
        self._started = False
        return self._ask({"op": "stop"})

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        if self._started:
            self.start()

    def _ask(self, request: dict) -> bool:
        with self._lock:
            try:
                answer = _request(self.socket_path, request)
            except OSError as error:
                message = f"ferroscope: no agent on {self.socket_path} ({error})"
                if self.required:
                    raise AgentUnavailable(message) from error
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                return False
        if not answer.get("ok"):
            raise ValueError(f"ferroscope: the agent refused: {answer.get('error')}")
        return True


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
