"""The Kubernetes autoscaling manifests: valid against the Kubernetes 1.35 schemas (strict), wired to the
warmpod_scale_factor gauge, and HPA's own formula on that gauge giving the policy's stable-window answer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from warmpod.pods.policy import PolicyConfig, PolicyState, ReplicaSample, decide, pod_scale_factor

COMPONENTS = Path(__file__).parents[2] / "deploy" / "components"
FILES = {
    "hpa.yaml": COMPONENTS / "hpa" / "hpa.yaml",
    "prometheus-adapter-values.yaml": COMPONENTS / "hpa" / "prometheus-adapter-values.yaml",
    "keda-scaledobject.yaml": COMPONENTS / "keda" / "keda-scaledobject.yaml",
}
K8S = "1.35.0"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(FILES[name].read_text(encoding="utf-8"))
    return doc


def test_hpa_passes_strict_schema_validation() -> None:
    kubernetes_validate.validate(load("hpa.yaml"), K8S, strict=True)


def test_hpa_scales_on_the_pods_metric_with_target_one() -> None:
    hpa = load("hpa.yaml")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "warmpod_scale_factor"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_adapter_rule_exposes_the_gauge_per_pod() -> None:
    (rule,) = load("prometheus-adapter-values.yaml")["rules"]["custom"]
    assert rule["seriesQuery"].startswith("warmpod_scale_factor{")
    assert rule["name"]["as"] == "warmpod_scale_factor"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_keda_scaled_object_uses_the_same_signal() -> None:
    so = load("keda-scaledobject.yaml")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert so["spec"]["scaleTargetRef"]["name"] == "warmpod"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"].startswith("sum(warmpod_scale_factor{")
    assert trigger["metadata"]["threshold"] == "1"
    for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval"):
        assert isinstance(so["spec"][key], int)


@pytest.mark.parametrize(("pods", "rate_per_pod"), [(2, 40.0), (3, 10.0), (4, 70.0)])
def test_hpa_formula_on_the_gauge_matches_the_policy(pods: int, rate_per_pod: float) -> None:
    """HPA: desired = ceil(current x avg(gauge) / 1.0). With evenly loaded pods this is the policy's stable answer."""
    config = PolicyConfig(stable_window_s=0, panic_window_s=0, scale_down_window_s=0, tolerance=0, max_replicas=50)
    fast = ((0.01, 0.0), (0.05, 100.0), (float("inf"), 100.0))
    samples = [ReplicaSample(f"p{i}", rate_rps=rate_per_pod, busy=rate_per_pod / 100, service_s=0.01,
                             latency_buckets=fast) for i in range(pods)]  # fmt: skip
    average = sum(pod_scale_factor(s, config) for s in samples) / pods
    hpa_desired = math.ceil(pods * average / 1.0)
    assert hpa_desired == decide(samples, pods, PolicyState(), 0.0, config).replicas
