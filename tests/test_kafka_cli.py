"""`streamrec kafka`, and starting Apache Kafka when something is wrong: a clear message, a
non-zero exit code, and no JVM left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from stream.kafka import EXIT_MISSING_TOOL, KafkaCluster, KafkaStartError


def streamrec(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamrec.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def java_processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "java" in line]


def test_java_too_old_is_refused_with_exit_code_3(tmp_path):
    fake = tmp_path / "jdk" / "bin"
    fake.mkdir(parents=True)
    (fake / "java").write_text('#!/bin/sh\necho \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    (fake / "java").chmod(0o755)
    result = streamrec("kafka", "--dir", str(tmp_path / "k"), env={"JAVA_HOME": str(tmp_path / "jdk")})
    assert result.returncode == EXIT_MISSING_TOOL
    assert "needs Java 17+" in result.stderr and "Java 11" in result.stderr


def test_missing_java_is_refused_with_exit_code_3(tmp_path):
    result = streamrec("kafka", "--dir", str(tmp_path / "k"), env={"PATH": str(tmp_path), "JAVA_HOME": ""})
    assert result.returncode == EXIT_MISSING_TOOL
    assert "no `java` on PATH" in result.stderr


def test_a_taken_port_is_refused_before_anything_starts(kafka_runtime, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = streamrec("kafka", "--port", str(port), "--dir", str(tmp_path / "k"))
    assert result.returncode == 2
    assert f"port(s) {port}" in result.stderr and "already in use" in result.stderr
    assert not java_processes(str(tmp_path))


@pytest.mark.integration
def test_a_node_that_dies_at_start_takes_the_others_down(kafka_runtime, tmp_path):
    cluster = KafkaCluster(nodes=3, data_dir=tmp_path / "k")
    cluster._write_config()
    bad = cluster.node_dir(1) / "data"
    bad.mkdir(parents=True)   # formatted for another cluster: the node refuses to start
    (bad / "meta.properties").write_text("version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id=1\n"
                                         "directory.id=AAAAAAAAAAAAAAAAAAAAAA\n")
    with pytest.raises(KafkaStartError, match="node 1"):
        cluster.start(timeout=60)
    assert not java_processes(str(tmp_path))


@pytest.mark.integration
def test_streamrec_kafka_runs_until_sigterm_and_keeps_its_data(kafka_runtime, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "streamrec.cli", "kafka", "--dir", str(tmp_path / "k")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert "bootstrap 127.0.0.1:" in line, line + proc.stdout.read()
        assert java_processes(str(tmp_path))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while java_processes(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not java_processes(str(tmp_path))
    assert (tmp_path / "k" / "node-0" / "data" / "meta.properties").exists()   # persistent log dir
