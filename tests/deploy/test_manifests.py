"""The Kustomize tree: every kustomization renders, validates against the Kubernetes 1.35 schemas (strict; custom
resources against their CRDs' schemas), and keeps the pod's invariants. Each invariant check is also shown to
catch the mistake it exists for, on a copy of the rendered base with that one mistake made."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.dockerfile import final_stage
from tests.deploy.manifests import (
    RENDERABLE,
    Doc,
    containers,
    crd_problems,
    find,
    is_custom_resource,
    pod_problems,
    render,
)
from tests.deploy.pod import dockerfile_for

K8S = "1.35.0"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: render(path) for name, path in RENDERABLE.items()}


def test_every_overlay_is_rendered() -> None:
    """The list the other tests walk is the tree: a new overlay cannot be added untested."""
    assert set(RENDERABLE) == {"base", "s3", "s3-compatible", "pvc", "image-volume", "hpa", "keda", "edge"}


@pytest.mark.parametrize("name", sorted(RENDERABLE))
def test_rendered_overlay_passes_strict_schema_validation(rendered: dict[str, list[Doc]], name: str) -> None:
    docs = rendered[name]
    for doc in docs:
        if not is_custom_resource(doc):
            kubernetes_validate.validate(doc, K8S, strict=True)
    assert crd_problems([d for d in docs if is_custom_resource(d)]) == []


@pytest.mark.parametrize("name", sorted(RENDERABLE))
def test_rendered_overlay_keeps_the_pod_invariants(rendered: dict[str, list[Doc]], name: str) -> None:
    assert pod_problems(rendered[name], name) == []


def test_a_source_and_an_autoscaler_compose(tmp_path: Path) -> None:
    """A user's own kustomization: a source overlay plus an autoscaling component, as docs/kubernetes.md shows."""
    deploy = Path(os.path.relpath(RENDERABLE["base"].parent, tmp_path))  # kustomize takes relative paths only
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {deploy / 'overlays' / 's3'}\ncomponents:\n  - {deploy / 'components' / 'hpa'}\n",
        encoding="utf-8",
    )
    docs = render(tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "HorizontalPodAutoscaler", "ServiceAccount"} <= kinds
    assert find(docs, "ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert pod_problems(docs, "s3+hpa") == []


def test_namespaces_enforce_the_restricted_pod_security_profile(rendered: dict[str, list[Doc]]) -> None:
    for name in ("base", "edge"):
        labels = find(rendered[name], "Namespace")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_sources_reach_the_loader_only(rendered: dict[str, list[Doc]]) -> None:
    """Each source overlay changes what the loader reads and nothing the server sees: the server's container
    is byte-for-byte the base's, and only the loader gets the model volume or the S3 settings."""
    base_server = containers(find(rendered["base"], "Deployment")["spec"]["template"]["spec"])["server"].spec
    for name in ("s3", "s3-compatible", "pvc", "image-volume"):
        pod = find(rendered[name], "Deployment")["spec"]["template"]["spec"]
        server = containers(pod)["server"].spec
        assert {k: v for k, v in server.items() if k != "env"} == {k: v for k, v in base_server.items() if k != "env"}
        loader = containers(pod)["loader"]
        models = loader.mount("models")
        if name in ("pvc", "image-volume"):
            assert models is not None and models["readOnly"] is True, name
            assert server.get("volumeMounts") == base_server["volumeMounts"]
        if name.startswith("s3"):
            assert loader.spec["envFrom"], name
    s3c = containers(find(rendered["s3-compatible"], "Deployment")["spec"]["template"]["spec"])["loader"].spec
    refs = {k: v["name"] for e in s3c["envFrom"] for k, v in e.items()}
    assert refs["secretRef"] == "warmpod-s3-credentials"
    endpoint_cm = find(rendered["s3-compatible"], "ConfigMap", refs["configMapRef"])
    assert endpoint_cm["data"]["AWS_ENDPOINT_URL_S3"].startswith("http")


def test_the_edge_runs_only_on_edge_nodes(rendered: dict[str, list[Doc]]) -> None:
    pod = find(rendered["edge"], "DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"warmpod.dev/edge": "true"}
    (edge,) = containers(pod).values()
    assert edge.spec["args"][:3] == ["edge", "serve", edge.mount("bundle")["mountPath"]]  # type: ignore[index]
    assert edge.mount("bundle")["readOnly"] is True  # type: ignore[index]


# ------------------------------------------------------------------- each check catches its mistake


def _pod(docs: list[Doc]) -> dict[str, Any]:
    pod: dict[str, Any] = find(docs, "Deployment")["spec"]["template"]["spec"]
    return pod


def _loader(docs: list[Doc]) -> dict[str, Any]:
    return containers(_pod(docs))["loader"].spec


def _server(docs: list[Doc]) -> dict[str, Any]:
    return containers(_pod(docs))["server"].spec


def _set_arg(container: dict[str, Any], flag: str, value: str) -> None:
    args = container["args"]
    args[args.index(flag) + 1] = value


def _drop_arg(container: dict[str, Any], flag: str) -> None:
    args = container["args"]
    del args[args.index(flag) : args.index(flag) + 2]


def _store(docs: list[Doc]) -> dict[str, Any]:
    return next(v for v in _pod(docs)["volumes"] if v["name"] == "store")


MISTAKES: dict[str, tuple[Callable[[list[Doc]], None], str]] = {
    "sidecar without restartPolicy": (
        lambda d: _loader(d).pop("restartPolicy"),
        "the loader must be a native sidecar (initContainers, restartPolicy: Always)",
    ),
    "store on disk": (
        lambda d: _store(d)["emptyDir"].pop("medium"),
        "the store volume must be an emptyDir with medium: Memory",
    ),
    "store without sizeLimit": (
        lambda d: _store(d)["emptyDir"].pop("sizeLimit"),
        "the store emptyDir needs a sizeLimit",
    ),
    "server mounts the store read-write": (
        lambda d: containers(_pod(d))["server"].mount("store").pop("readOnly"),  # type: ignore[union-attr]
        "server must mount the store read-only",
    ),
    "server reads another store path": (
        lambda d: _set_arg(_server(d), "--store", "/elsewhere"),
        "server uses --store /elsewhere but mounts the store at /store",
    ),
    "pod may run as root": (
        lambda d: _pod(d)["securityContext"].update(runAsNonRoot=False),
        "pod securityContext.runAsNonRoot must be true",
    ),
    "container runs as root": (
        lambda d: _loader(d)["securityContext"].update(runAsUser=0),
        "container loader runs as root",
    ),
    "writable root filesystem": (
        lambda d: _server(d)["securityContext"].update(readOnlyRootFilesystem=False),
        "container server: readOnlyRootFilesystem must be true",
    ),
    "privilege escalation": (
        lambda d: _server(d)["securityContext"].pop("allowPrivilegeEscalation"),
        "container server: allowPrivilegeEscalation must be false",
    ),
    "capabilities kept": (
        lambda d: _loader(d)["securityContext"]["capabilities"].update(drop=[]),
        "container loader: capabilities must drop ALL",
    ),
    "probe path the server does not serve": (
        lambda d: _server(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
        "server readinessProbe path /healthz is not a route of `warmpod serve`",
    ),
    "probe on another port": (
        lambda d: _server(d)["livenessProbe"]["httpGet"].update(port=9999),
        "server livenessProbe port 9999 is not the --port 8080",
    ),
    "probe on an undeclared port name": (
        lambda d: _server(d)["readinessProbe"]["httpGet"].update(port="metrics"),
        "readinessProbe: container server: no port named 'metrics'",
    ),
    "process listens elsewhere": (
        lambda d: _set_arg(_server(d), "--port", "9000"),
        "container server listens on --port 9000, not a declared containerPort",
    ),
    "process binds loopback": (
        lambda d: _set_arg(_loader(d), "--host", "127.0.0.1"),
        "container loader binds --host 127.0.0.1",
    ),
    "service targets a missing port": (
        lambda d: find(d, "Service")["spec"]["ports"][0].update(targetPort="web"),
        "targetPort web is no container port",
    ),
    "PDB selects nothing": (
        lambda d: find(d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(app="other"),
        "PodDisruptionBudget/warmpod selector",
    ),
    "loader limit below the tmpfs": (
        lambda d: _loader(d)["resources"]["limits"].update(memory="128Mi"),
        "loader memory limit 134217728 B < store sizeLimit + --max-buffer",
    ),
    "grace period shorter than the drain": (
        lambda d: _pod(d).update(terminationGracePeriodSeconds=10),
        "terminationGracePeriodSeconds 10 < preStop 5 + drain 20 + 5",
    ),
    "sidecar that stops after one load": (
        lambda d: _drop_arg(_loader(d), "--watch"),
        "the sidecar must --watch",
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_invariant_check_catches_its_mistake(rendered: dict[str, list[Doc]], mistake: str) -> None:
    make, message = MISTAKES[mistake]
    docs = copy.deepcopy(rendered["base"])
    make(docs)
    problems = pod_problems(docs, "base")
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("overlay", ["hpa", "keda"])
def test_autoscaler_checks_catch_their_mistakes(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = copy.deepcopy(rendered[overlay])
    scaler = next(d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"))
    del scaler["metadata"]["namespace"]
    find(docs, "Deployment")["spec"]["replicas"] = 2
    problems = pod_problems(docs, overlay)
    assert any("is not in the Deployment's namespace warmpod" in p for p in problems), problems
    assert any("the Deployment must not set replicas" in p for p in problems), problems


def test_strict_validation_rejects_an_unknown_field(rendered: dict[str, list[Doc]]) -> None:
    docs = copy.deepcopy(rendered["base"])
    _server(docs)["readinesProbe"] = _server(docs)["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(find(docs, "Deployment"), K8S, strict=True)


def test_crd_validation_rejects_a_wrong_type(rendered: dict[str, list[Doc]]) -> None:
    monitor = copy.deepcopy(find(rendered["base"], "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 8080
    scaled = copy.deepcopy(find(rendered["keda"], "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "one"
    problems = crd_problems([monitor, scaled])
    assert problems == [
        "PodMonitor/warmpod: data/spec/podMetricsEndpoints/0/port must be string",
        "ScaledObject/warmpod: data/spec/minReplicaCount must be integer",
    ]


@pytest.mark.parametrize("name", ["base", "pvc", "image-volume", "edge"])
def test_containers_run_as_their_image_user_and_write_only_its_volumes(
    rendered: dict[str, list[Doc]], name: str
) -> None:
    """The pod and the image agree: the UID the pod enforces is the image's USER, and the writable mounts (the
    read-only root filesystem leaves nothing else) are exactly the image's declared VOLUMEs."""
    workload = next(d for d in rendered[name] if d["kind"] in ("Deployment", "DaemonSet"))
    pod = workload["spec"]["template"]["spec"]
    for c in containers(pod).values():
        stage = final_stage(dockerfile_for(c.spec["image"]))
        assert stage.user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
        writable = {m["mountPath"] for m in c.spec["volumeMounts"] if not m.get("readOnly")}
        assert writable == set(stage.volumes), c.name
