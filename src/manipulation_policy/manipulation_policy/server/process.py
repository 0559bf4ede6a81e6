"""Run a real policy server process on loopback, for tests, benchmarks and demos.

    with running_server("--backend", "stub") as base_url:
        requests.post(f"{base_url}/infer", json={...})

The server is ``python -m manipulation_policy.policy_server`` on 127.0.0.1 and a
free port; the context waits (bounded) until /health answers, and on exit sends
SIGTERM, waits, and kills only if the server does not stop in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Optional

LOOPBACK = "127.0.0.1"
_PORT_TAKEN = "address already in use"


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health in time; carries its log."""


class ServerProcess:
    """One policy server subprocess. ``start()`` returns once /health answers."""

    def __init__(
        self,
        *args: str,
        port: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        extra_pythonpath: Sequence[str] = (),
        startup_timeout: float = 30.0,
        preexec_fn: Optional[Callable[[], None]] = None,
    ):
        self.args = tuple(args)
        self._preexec_fn = preexec_fn  # e.g. lower a resource limit of the server only
        self.host = LOOPBACK
        self._fixed_port = port
        self.port = port or 0
        self._env = dict(os.environ)
        self._env.update(env or {})
        if extra_pythonpath:
            paths = list(extra_pythonpath) + [self._env.get("PYTHONPATH", "")]
            self._env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self._log_path: Optional[str] = None
        self._log_text = ""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "manipulation_policy.policy_server",
            "--host", self.host, "--port", str(self.port), *self.args,
        ]  # fmt: skip

    def start(self) -> ServerProcess:
        # A port picked here may be taken by someone else before the server binds it.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            self._spawn()
            try:
                self._wait_healthy()
                return self
            except ServerStartError:
                self.stop()
                if _PORT_TAKEN not in self._log_text.lower() or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        descriptor, self._log_path = tempfile.mkstemp(prefix="policy_server_", suffix=".log")
        os.close(descriptor)
        self._log_text = ""
        # Append mode: the server's writes never land where a reader of the log has seeked.
        with open(self._log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=self._preexec_fn,
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"policy server exited with code {self.process.returncode} while starting:\n"
                    f"{self.log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=1.0) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        raise ServerStartError(
            f"policy server did not answer /health within {self.startup_timeout} s:\n{self.log()}"
        )

    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        if self._log_path is not None:
            with open(self._log_path, "rb") as log_file:
                self._log_text = log_file.read().decode("utf-8", "replace")
        return self._log_text

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) without waiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.process is None:
            return None
        self.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)
        self.log()
        if self._log_path is not None:
            os.unlink(self._log_path)
            self._log_path = None
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(
    *args: str,
    env: Optional[Mapping[str, str]] = None,
    extra_pythonpath: Sequence[str] = (),
    startup_timeout: float = 30.0,
) -> Iterator[str]:
    """A policy server with CLI ``args`` on 127.0.0.1:<free port>; yields its base URL."""
    with ServerProcess(
        *args, env=env, extra_pythonpath=extra_pythonpath, startup_timeout=startup_timeout
    ) as server:
        yield server.base_url
