"""docker/ can't run here (no engine), so check what can be checked without one."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_is_valid():
    result = subprocess.run(["docker-compose", "-f", str(DOCKER / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_wires_worker_metrics_to_prometheus():
    compose = (DOCKER / "docker-compose.yml").read_text()
    prometheus = (DOCKER / "prometheus.yml").read_text()
    assert '"--metrics-port", "9108"' in compose and "worker:9108" in prometheus
    assert "KAFKA_PROCESS_ROLES" in compose  # KRaft, no ZooKeeper


def test_grafana_dashboard_is_json_with_the_key_panels():
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "streamrec.json").read_text())
    exprs = json.dumps(dashboard)
    for metric in ("kafka_consumergroup_lag", "streamrec_events_processed_total",
                   "streamrec_event_to_list_latency_seconds", "streamrec_dlq_messages_total",
                   "streamrec_recommend_busy_seconds_total", "streamrec_cpu_wait_seconds_total"):
        assert metric in exprs


def test_compose_runs_the_kafka_version_the_tests_run():
    from stream.kafka import KAFKA_VERSION

    text = (DOCKER / "docker-compose.yml").read_text()
    assert f"image: apache/kafka:{KAFKA_VERSION}" in text, "docker/ and stream/kafka.py disagree on the Kafka version"
