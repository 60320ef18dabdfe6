"""A local Apache Kafka (KRaft): fetched from Maven Central on first use, run on loopback.

``streamrec kafka`` and the test suite use it so that everything streamrec promises is also
measured on the broker shops run. The jars are resolved with Maven into a cache outside the
repository (``$STREAMREC_CACHE``, else ``~/.cache/streamrec``), once per version. Each node is
a combined broker + controller JVM with its own persistent log directory; a cluster directory
can be stopped and started again and keeps its topics, offsets and ports.

    with KafkaCluster(nodes=3, data_dir=tmp) as kafka:
        kafka.bootstrap                  # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        kafka.kill_node(1)               # SIGKILL one node (failover tests)
        kafka.start_node(1)
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from stream.broker import LOOPBACK, free_port, port_is_free

log = logging.getLogger(__name__)

# The one place the Kafka version is pinned; docker/docker-compose.yml uses the same (a test checks).
KAFKA_VERSION = "4.3.1"
SCALA_VERSION = "2.13"
MIN_JAVA = 17                      # Kafka 4 brokers need Java 17+
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
HEAP = "-Xmx768m"
EXIT_MISSING_TOOL = 3              # `streamrec kafka` exit code when Java or Maven is missing

# The log4j binding and the admin tools (kafka-consumer-groups) are not dependencies of the
# broker artifact, so they are fetched beside it.
_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>streamrec.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{scala}</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>2.25.5</version></dependency>
  </dependencies>
</project>
"""

_LOG4J = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = warn
"""


class KafkaUnavailable(RuntimeError):
    """Java or Maven is missing or too old, or the jars cannot be fetched."""


class KafkaStartError(RuntimeError):
    """A node did not come up (port taken, bad directory, crashed JVM); nothing is left running."""


# ----------------------------------------------------------------------------- the jars

def cache_root() -> Path:
    if os.environ.get("STREAMREC_CACHE"):
        return Path(os.environ["STREAMREC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamrec"


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not candidate or not Path(candidate).exists():
        raise KafkaUnavailable(f"Apache Kafka needs Java {MIN_JAVA}+; no `java` on PATH "
                               "(install a JDK, e.g. `apt-get install openjdk-17-jre-headless`, or set JAVA_HOME)")
    return candidate


def java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise KafkaUnavailable(f"cannot tell the version of {java}: {out.stderr.strip()[:200]}")
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 else major   # "1.8.0" is Java 8


def check_java() -> str:
    java = java_binary()
    major = java_major(java)
    if major < MIN_JAVA:
        raise KafkaUnavailable(f"Apache Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+, but {java} is Java {major}")
    return java


def kafka_libs(version: str = KAFKA_VERSION, *, quiet: bool = False) -> Path:
    """The folder of jars for ``version``, fetched with Maven the first time."""
    libs = cache_root() / f"kafka-{version}" / "libs"
    if (libs / f"kafka_{SCALA_VERSION}-{version}.jar").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaUnavailable("fetching Apache Kafka needs Maven (`mvn` on PATH; e.g. `apt-get install maven`)")
    check_java()
    work = libs.parent / f".fetch-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "pom.xml").write_text(_POM.format(version=version, scala=SCALA_VERSION))
    if not quiet:
        log.warning("fetching Apache Kafka %s with Maven into %s (once)", version, libs)
    started = time.monotonic()
    result = subprocess.run([mvn, "-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime",
                             "-DoutputDirectory=libs"], cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise KafkaUnavailable(f"Maven could not fetch Apache Kafka {version}:\n"
                               f"{(result.stdout + result.stderr).strip()[-2000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    (work / "libs").rename(libs)
    shutil.rmtree(work, ignore_errors=True)
    log.info("fetched Apache Kafka %s in %.1fs", version, time.monotonic() - started)
    return libs


def run_tool(main_class: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run one of Kafka's own command-line tools (a JVM) from the cached jars."""
    return subprocess.run([check_java(), "-cp", f"{kafka_libs()}/*", main_class, *args],
                          capture_output=True, text=True, timeout=timeout)


def describe_consumer_group(bootstrap: str, group: str) -> list[dict]:
    """``kafka-consumer-groups --describe``: one dict per partition row, as Kafka's tool prints it."""
    result = run_tool("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                      "--bootstrap-server", bootstrap, "--describe", "--group", group)
    if result.returncode != 0:
        raise RuntimeError(f"kafka-consumer-groups failed: {result.stderr.strip()[-1000:]}")
    rows, header = [], None
    for line in result.stdout.splitlines():
        cells = line.split()
        if cells[:1] == ["GROUP"]:
            header = cells
        elif header and len(cells) == len(header):
            row = dict(zip(header, cells))
            rows.append({"topic": row["TOPIC"], "partition": int(row["PARTITION"]),
                         "committed": None if row["CURRENT-OFFSET"] == "-" else int(row["CURRENT-OFFSET"]),
                         "end": int(row["LOG-END-OFFSET"]),
                         "lag": None if row["LAG"] == "-" else int(row["LAG"])})
    return rows


# ----------------------------------------------------------------------------- a cluster

def new_cluster_id() -> str:
    """A random Kafka UUID in its base64 form; like Kafka's own, never starting with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class _Layout:
    """What a cluster directory remembers across restarts (``cluster.json``)."""

    cluster_id: str
    host: str
    broker_ports: list[int]
    controller_ports: list[int]

    @property
    def nodes(self) -> int:
        return len(self.broker_ports)


class KafkaCluster:
    """``nodes`` combined broker+controller JVMs on loopback, with persistent log directories."""

    kind = "kafka"

    def __init__(self, nodes: int = 1, port: int | None = None, data_dir: str | Path | None = None,
                 host: str = LOOPBACK, version: str = KAFKA_VERSION, heap: str = HEAP):
        if nodes not in (1, 3):
            raise ValueError("nodes must be 1 or 3")
        self.version = version
        self.heap = heap
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir is not None else Path(_mkdtemp())
        self.layout = self._load_or_plan(nodes, port, host)
        self._procs: list[subprocess.Popen | None] = [None] * nodes
        self._java: str | None = None
        self._libs: Path | None = None

    # --- configuration
    def _load_or_plan(self, nodes: int, port: int | None, host: str) -> _Layout:
        saved = self.dir / "cluster.json"
        if saved.exists():
            layout = _Layout(**json.loads(saved.read_text()))
            if layout.nodes != nodes:
                raise KafkaStartError(f"{self.dir} holds a {layout.nodes}-node cluster, not {nodes}")
            if port is not None:
                layout.broker_ports[0] = port
            return layout
        broker_ports = [port or free_port(host)] + [free_port(host) for _ in range(nodes - 1)]
        layout = _Layout(new_cluster_id(), host, broker_ports, [free_port(host) for _ in range(nodes)])
        return layout

    @property
    def nodes(self) -> int:
        return self.layout.nodes

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{self.layout.host}:{p}" for p in self.layout.broker_ports)

    @property
    def pids(self) -> list[int]:
        """The running nodes' JVMs (``bench e2e`` counts their CPU)."""
        return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def node_bootstrap(self, node: int) -> str:
        return f"{self.layout.host}:{self.layout.broker_ports[node]}"

    def node_dir(self, node: int) -> Path:
        return self.dir / f"node-{node}"

    def log_path(self, node: int) -> Path:
        return self.node_dir(node) / "server.log"

    def _properties(self, node: int) -> str:
        lay, n = self.layout, self.layout.nodes
        voters = ",".join(f"{i}@{lay.host}:{p}" for i, p in enumerate(lay.controller_ports))
        replication = min(3, n)
        settings = {
            "process.roles": "broker,controller",
            "node.id": node,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{lay.host}:{lay.broker_ports[node]},CONTROLLER://{lay.host}:{lay.controller_ports[node]}",
            "advertised.listeners": f"PLAINTEXT://{lay.host}:{lay.broker_ports[node]}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": self.node_dir(node) / "data",
            # topics are always created explicitly (as in docker/): a typo must not create one
            "auto.create.topics.enable": "false",
            "num.partitions": 1,
            "default.replication.factor": replication,
            "min.insync.replicas": min(2, n),
            "offsets.topic.replication.factor": replication,
            "offsets.topic.num.partitions": 8,
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": min(2, n),
            "transaction.state.log.num.partitions": 8,
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": min(2, n),
            # a local cluster: start a new group's first generation at once
            "group.initial.rebalance.delay.ms": 0,
        }
        return "".join(f"{k}={v}\n" for k, v in settings.items())

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cluster.json").write_text(json.dumps(asdict(self.layout)))
        for node in range(self.nodes):
            d = self.node_dir(node)
            d.mkdir(parents=True, exist_ok=True)
            (d / "server.properties").write_text(self._properties(node))
            (d / "log4j2.properties").write_text(_LOG4J.format(path=self.log_path(node)))

    def _format(self, node: int) -> None:
        if (self.node_dir(node) / "data" / "meta.properties").exists():
            return
        result = subprocess.run([self._java, "-cp", f"{self._libs}/*", "kafka.tools.StorageTool", "format",
                                 f"--cluster-id={self.layout.cluster_id}", "-c", str(self.node_dir(node) / "server.properties")],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise KafkaStartError(f"formatting node {node} failed: {result.stderr.strip()[-1000:]}")

    # --- lifecycle
    def start(self, timeout: float = START_TIMEOUT_S) -> "KafkaCluster":
        self._java = check_java()
        self._libs = kafka_libs(self.version)
        taken = [p for p in self.layout.broker_ports + self.layout.controller_ports
                 if not port_is_free(self.layout.host, p)]
        if taken:
            raise KafkaStartError(f"port(s) {', '.join(map(str, taken))} on {self.layout.host} already in use")
        self._write_config()
        try:
            for node in range(self.nodes):
                self._format(node)
            for node in range(self.nodes):
                self._spawn(node)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Apache Kafka %s: %d node(s) on %s (dir %s)", self.version, self.nodes, self.bootstrap, self.dir)
        return self

    def _spawn(self, node: int) -> None:
        d = self.node_dir(node)
        cmd = [self._java, self.heap, "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={d / 'log4j2.properties'}", f"-Dkafka.logs.dir={d}",
               "-cp", f"{self._libs}/*", "kafka.Kafka", str(d / "server.properties")]
        with open(d / "stdout.log", "ab") as out:
            self._procs[node] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = START_TIMEOUT_S, nodes: list[int] | None = None) -> None:
        """Until every running node accepts connections and the cluster lists all live brokers."""
        nodes = [n for n in (nodes if nodes is not None else range(self.nodes)) if self._procs[n] is not None]
        deadline = time.monotonic() + timeout
        for node in nodes:
            while True:
                proc = self._procs[node]
                if proc.poll() is not None:
                    raise KafkaStartError(f"Kafka node {node} exited with code {proc.returncode}:\n"
                                          f"{self._log_tail(node)}")
                if not port_is_free(self.layout.host, self.layout.broker_ports[node]):
                    break
                if time.monotonic() > deadline:
                    raise KafkaStartError(f"Kafka node {node} not listening after {timeout:.0f}s:\n{self._log_tail(node)}")
                time.sleep(0.1)
        live = {n for n in range(self.nodes) if self._procs[n] is not None and self._procs[n].poll() is None}
        remaining = max(1.0, deadline - time.monotonic())
        try:
            _run_in_thread(_wait_for_brokers(",".join(self.node_bootstrap(n) for n in live), live, remaining))
        except TimeoutError as exc:
            raise KafkaStartError(f"{exc}\n{self._log_tail(min(live))}") from None

    def _log_tail(self, node: int, chars: int = 2000) -> str:
        texts = []
        for name in ("stdout.log", "server.log"):
            path = self.node_dir(node) / name
            if path.exists():
                texts.append(path.read_text(errors="replace")[-chars:])
        return "\n".join(t for t in texts if t.strip()) or "(no log output)"

    def stop_node(self, node: int, kill: bool = False) -> None:
        """Stop one node: SIGTERM (controlled shutdown) or SIGKILL."""
        proc, self._procs[node] = self._procs[node], None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill_node(self, node: int) -> None:
        self.stop_node(node, kill=True)

    def start_node(self, node: int, timeout: float = START_TIMEOUT_S) -> None:
        if self._procs[node] is not None and self._procs[node].poll() is None:
            return
        self._spawn(node)
        self.wait_ready(timeout, nodes=[node])

    def running(self, node: int) -> bool:
        proc = self._procs[node]
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        """Stop every JVM this object started (all at once, so no node waits for a departed quorum)."""
        procs = [(n, p) for n, p in enumerate(self._procs) if p is not None]
        self._procs = [None] * self.nodes
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait(self) -> int:
        """Block until any node exits (the foreground CLI); returns its exit code."""
        while True:
            for proc in self._procs:
                if proc is not None and proc.poll() is not None:
                    return proc.returncode
            time.sleep(0.5)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "KafkaCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _mkdtemp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="streamrec-kafka-")


def _run_in_thread(coro):
    """``asyncio.run`` on a thread of its own: callable from sync code and from async tests alike."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _wait_for_brokers(bootstrap: str, nodes: set[int], timeout: float) -> None:
    """Until metadata lists every node in ``nodes`` (a broker is usable once registered)."""
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            last = {b["node_id"] for b in cluster["brokers"]}
            if nodes <= last:
                return
        except Exception as exc:  # not up yet
            last = repr(exc)
        finally:
            await admin.close()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the cluster did not list brokers {sorted(nodes)} in {timeout:.0f}s (last: {last})")
