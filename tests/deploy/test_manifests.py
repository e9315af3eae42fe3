"""The Kustomize tree: every kustomization renders, validates against the Kubernetes 1.35 schemas (strict; custom
resources against their CRDs' schemas), and keeps the pod's invariants. Each invariant check is also shown to
catch the mistake it exists for, on a copy of the rendered base (the node agent's render, the node-cache overlay)
with that one mistake made."""

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
    NODE_CACHE_OVERLAYS,
    NODE_DRIVER,
    RENDERABLE,
    Doc,
    containers,
    crd_problems,
    csi_driver_name_problems,
    find,
    is_custom_resource,
    node_cache_problems,
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
    assert set(RENDERABLE) == {
        "base", "s3", "s3-compatible", "pvc", "image-volume", "hpa", "keda", "edge", "node-cache", "node", "tls"
    }  # fmt: skip
    assert set(RENDERABLE) >= NODE_CACHE_OVERLAYS


@pytest.mark.parametrize("name", sorted(RENDERABLE))
def test_rendered_overlay_passes_strict_schema_validation(rendered: dict[str, list[Doc]], name: str) -> None:
    docs = rendered[name]
    for doc in docs:
        if not is_custom_resource(doc):
            kubernetes_validate.validate(doc, K8S, strict=True)
    assert crd_problems([d for d in docs if is_custom_resource(d)]) == []


@pytest.mark.parametrize("name", sorted(RENDERABLE))
def test_rendered_overlay_keeps_the_pod_invariants(rendered: dict[str, list[Doc]], name: str) -> None:
    assert pod_problems(rendered[name], name, node_cache=name in NODE_CACHE_OVERLAYS) == []


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
    for name in ("base", "edge", "node-cache", "tls"):
        labels = find(rendered[name], "Namespace")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.process
def test_only_the_node_agents_namespace_is_privileged(rendered: dict[str, list[Doc]]) -> None:
    """The agent's namespace enforces privileged and holds nothing but the agent; every other namespace is
    restricted, the node-cache workload's included."""
    levels = {
        d["metadata"]["name"]: d["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for docs in rendered.values()
        for d in docs
        if d["kind"] == "Namespace"
    }
    assert {ns for ns, level in levels.items() if level != "restricted"} == {"warmpod-system"}
    assert levels["warmpod-system"] == "privileged"
    workloads = [d for d in rendered["node"] if "template" in d.get("spec", {})]
    assert [(d["kind"], d["metadata"]["name"]) for d in workloads] == [("DaemonSet", "warmpod-node")]


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


@pytest.mark.process
def test_the_node_cache_overlay_is_the_base_without_its_loader(rendered: dict[str, list[Doc]]) -> None:
    """The node-cache workload keeps the base's server container (command, probes, drain, security, resources) byte
    for byte; it loses the loader, the loader's scrape endpoint and the tmpfs, so the pod's memory is the server's
    process only, and its store is the agent's volume for the agent's catalog."""
    base, cache = _pod(rendered["base"]), _pod(rendered["node-cache"])
    base_server, server = containers(base)["server"].spec, containers(cache)["server"].spec
    assert {k: v for k, v in server.items() if k != "env"} == {k: v for k, v in base_server.items() if k != "env"}
    assert list(containers(cache)) == ["server"] and "initContainers" not in cache
    limits = [c["resources"]["limits"]["memory"] for c in cache["containers"]]
    assert limits == [base_server["resources"]["limits"]["memory"]]
    monitor = find(rendered["node-cache"], "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in monitor] == ["metrics"]
    assert find(rendered["node-cache"], "ConfigMap")["data"] == {"WARMPOD_MODEL": "all-MiniLM-L6-v2"}
    assert node_cache_problems(rendered["node"], rendered["node-cache"], "node+node-cache") == []


@pytest.mark.unit
def test_the_csi_driver_name_is_one_the_api_server_accepts() -> None:
    """A CSI driver name is a DNS subdomain of at most 63 characters (the API server's ValidateCSIDriverName, for
    the CSIDriver and a pod's csi.driver alike); the schemas do not say so, so this rule does."""
    assert csi_driver_name_problems(NODE_DRIVER) == []
    for bad in ("warmpod.dev/node", "Node_Warmpod", "-node.warmpod.dev", "x" * 64):
        assert csi_driver_name_problems(bad), bad


@pytest.mark.unit
def test_the_agent_announces_the_manifests_driver_name() -> None:
    """The kubelet registers the plugin under the name its GetPluginInfo answers: it must be the CSIDriver's and
    the pods' `csi.driver`."""
    from warmpod.node.csi import DRIVER_NAME

    assert csi_driver_name_problems(DRIVER_NAME) == []
    assert DRIVER_NAME == NODE_DRIVER


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
        lambda d: _server(d)["readinessProbe"]["httpGet"].update(port="admin"),
        "readinessProbe: container server: no port named 'admin'",
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


@pytest.mark.parametrize("name", ["base", "pvc", "image-volume", "edge", "node-cache", "node", "tls"])
def test_containers_run_as_their_image_user_and_write_only_its_volumes(
    rendered: dict[str, list[Doc]], name: str
) -> None:
    """The pod and the image agree: the UID the pod enforces is the image's USER (root: the node image sets none),
    and the writable mounts (the read-only root filesystem leaves nothing else) are exactly the image's declared
    VOLUMEs. Only warmpod's images (the node agent's registrar is Kubernetes')."""
    workload = next(d for d in rendered[name] if d["kind"] in ("Deployment", "DaemonSet"))
    pod = workload["spec"]["template"]["spec"]
    ours = [c for c in containers(pod).values() if c.spec["image"].startswith("ghcr.io/warmpod/")]
    assert ours
    for c in ours:
        stage = final_stage(dockerfile_for(c.spec["image"]))
        security = {**pod.get("securityContext", {}), **c.spec.get("securityContext", {})}
        user = f"{security['runAsUser']}:{security['runAsGroup']}"
        assert (stage.user or "0:0") == user, c.name
        writable = {m["mountPath"] for m in c.spec["volumeMounts"] if not m.get("readOnly")}
        assert writable == set(stage.volumes), c.name


# ------------------------------------------------- the node agent's and the node cache's checks catch their mistakes


def _agent_pod(docs: list[Doc]) -> dict[str, Any]:
    pod: dict[str, Any] = find(docs, "DaemonSet")["spec"]["template"]["spec"]
    return pod


def _agent(docs: list[Doc]) -> dict[str, Any]:
    return containers(_agent_pod(docs))["agent"].spec


def _registrar(docs: list[Doc]) -> dict[str, Any]:
    return containers(_agent_pod(docs))["node-driver-registrar"].spec


def _mount(container: dict[str, Any], volume: str) -> dict[str, Any]:
    return next(m for m in container["volumeMounts"] if m["name"] == volume)


def _set_go_flag(container: dict[str, Any], flag: str, value: str) -> None:
    args = container["args"]
    (i,) = [i for i, a in enumerate(args) if a.startswith(f"--{flag}=")]
    args[i] = f"--{flag}={value}"


def _admit_only_port(docs: list[Doc], port: int) -> None:
    for rule in find(docs, "NetworkPolicy")["spec"]["ingress"]:
        rule["ports"] = [{"port": port, "protocol": "TCP"}]


def _peer_rule(docs: list[Doc]) -> dict[str, Any]:
    rule: dict[str, Any] = find(docs, "NetworkPolicy")["spec"]["ingress"][0]
    return rule


NODE_MISTAKES: dict[str, tuple[Callable[[list[Doc]], None], str]] = {
    "agent not privileged": (
        lambda d: _agent(d)["securityContext"].update(privileged=False),
        "the agent must be privileged",
    ),
    "agent not root": (
        lambda d: _agent(d)["securityContext"].update(runAsUser=1000),
        "the agent must run as root (runAsUser: 0)",
    ),
    "agent root filesystem writable": (
        lambda d: _agent(d)["securityContext"].update(readOnlyRootFilesystem=False),
        "container agent: readOnlyRootFilesystem must be true",
    ),
    "registrar privileged": (
        lambda d: _registrar(d)["securityContext"].update(privileged=True),
        "container node-driver-registrar must not be privileged",
    ),
    "registrar keeps capabilities": (
        lambda d: _registrar(d)["securityContext"]["capabilities"].update(drop=[]),
        "container node-driver-registrar: capabilities must drop ALL",
    ),
    "registrar mounts Bidirectional": (
        lambda d: _mount(_registrar(d), "plugin-dir").update(mountPropagation="Bidirectional"),
        "container node-driver-registrar must not mount /csi Bidirectional",
    ),
    "agent namespace not privileged": (
        lambda d: find(d, "Namespace")["metadata"]["labels"].update({"pod-security.kubernetes.io/enforce": "baseline"}),
        "namespace warmpod-system must enforce privileged",
    ),
    "API token mounted": (
        lambda d: _agent_pod(d).update(automountServiceAccountToken=True),
        "the agent pod needs no Kubernetes API token",
    ),
    "kubelet dir without propagation": (
        lambda d: _mount(_agent(d), "kubelet-dir").pop("mountPropagation"),
        "the kubelet dir must be mounted with mountPropagation: Bidirectional",
    ),
    "kubelet dir at another path": (
        lambda d: _mount(_agent(d), "kubelet-dir").update(mountPath="/kubelet"),
        "the agent must mount the host's /var/lib/kubelet at /var/lib/kubelet",
    ),
    "node store without propagation": (
        lambda d: _mount(_agent(d), "node-store").pop("mountPropagation"),
        "--root /var/lib/warmpod/node-store must be mounted Bidirectional",
    ),
    "node store in the container": (
        lambda d: _agent(d)["volumeMounts"].remove(_mount(_agent(d), "node-store")),
        "--root /var/lib/warmpod/node-store must be on a hostPath volume",
    ),
    "kubelet told another socket": (
        lambda d: _set_go_flag(_registrar(d), "kubelet-registration-path", "/var/lib/kubelet/plugins/x/csi.sock"),
        "but the registrar's --kubelet-registration-path is /var/lib/kubelet/plugins/x/csi.sock",
    ),
    "registrar dials another socket": (
        lambda d: _set_go_flag(_registrar(d), "csi-address", "/csi/other.sock"),
        "the registrar's --csi-address /csi/other.sock is /var/lib/kubelet/plugins/node.warmpod.dev/other.sock",
    ),
    "agent serves its socket in the container": (
        lambda d: _set_arg(_agent(d), "--csi-socket", "/tmp/csi.sock"),
        "--csi-socket /tmp/csi.sock is not on a hostPath volume",
    ),
    "registrar without the registration dir": (
        lambda d: _registrar(d)["volumeMounts"].remove(_mount(_registrar(d), "registration-dir")),
        "the registrar must mount the host's /var/lib/kubelet/plugins_registry at /registration",
    ),
    "memory limit below the tmpfs": (
        lambda d: _agent(d)["resources"]["limits"].update(memory="2Gi"),
        "agent memory limit 2147483648 B < --max-bytes + the loader's buffer + the process",
    ),
    "budget raised without the limit": (
        lambda d: _set_arg(_agent(d), "--max-bytes", "4GiB"),
        "< --max-bytes + the loader's buffer + the process",
    ),
    "memory request below the limit": (
        lambda d: _agent(d)["resources"]["requests"].update(memory="1Gi"),
        "the agent's memory request must equal its limit",
    ),
    "ready before it is": (
        lambda d: _agent(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
        "the agent's readinessProbe must be GET /ready",
    ),
    "probe the agent does not serve": (
        lambda d: _agent(d)["livenessProbe"]["httpGet"].update(path="/livez"),
        "agent livenessProbe path /livez is not a route of `warmpod node`",
    ),
    "agent listens elsewhere": (
        lambda d: _set_arg(_agent(d), "--port", "9000"),
        "container agent listens on --port 9000, not a declared containerPort",
    ),
    "not node-critical": (
        lambda d: _agent_pod(d).pop("priorityClassName"),
        "priorityClassName must be system-node-critical",
    ),
    "critical class without its quota": (
        lambda d: d.remove(find(d, "ResourceQuota")),
        "no ResourceQuota in warmpod-system covers the agent's priority class",
    ),
    "kept off tainted nodes": (
        lambda d: _agent_pod(d).update(tolerations=[{"key": "gpu", "operator": "Exists"}]),
        "the agent must tolerate every taint",
    ),
    "two nodes updated at once": (
        lambda d: find(d, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"].update(maxUnavailable=2),
        "updateStrategy must be RollingUpdate with maxUnavailable: 1",
    ),
    "blind to pods' processes": (
        lambda d: _agent_pod(d).pop("hostPID"),
        "the agent needs hostPID",
    ),
    "node id from the hostname": (
        lambda d: _agent(d).pop("env"),
        "NODE_NAME must come from the pod's spec.nodeName",
    ),
    "peers not headless": (
        lambda d: find(d, "Service")["spec"].pop("clusterIP"),
        "Service/warmpod-node-peers must be headless",
    ),
    "starting agents as peers": (
        lambda d: find(d, "Service")["spec"].update(publishNotReadyAddresses=True),
        "must not publish not-ready agents as peers",
    ),
    "peers from another Service": (
        lambda d: _set_arg(_agent(d), "--peers", "http://warmpod-node-other.warmpod-system.svc:8479"),
        "no Service/warmpod-node-other in namespace warmpod-system",
    ),
    "peers on another port": (
        lambda d: _set_arg(_agent(d), "--peers", "http://warmpod-node-peers.warmpod-system.svc:9999"),
        "port 9999 is not a port of Service/warmpod-node-peers",
    ),
    "peer Service reaches another port": (
        lambda d: find(d, "Service")["spec"]["ports"][0].update(targetPort=9000),
        "Service/warmpod-node-peers port 8479 does not reach the agent's --port 8479",
    ),
    "peer token committed": (
        lambda d: d.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "data": {"token": "Y2hhbmdlLW1l"},
                "metadata": {"name": "warmpod-node-peer-token", "namespace": "warmpod-system"},
            }
        ),
        "the peer token Secret warmpod-node-peer-token must not be in the render",
    ),
    "peer token on a writable mount": (
        lambda d: _mount(_agent(d), "peer-token").pop("readOnly"),
        "must be on a read-only Secret volume",
    ),
    "catalog that is not JSON": (
        lambda d: find(d, "ConfigMap")["data"].update({"catalog.json": "{"}),
        "--catalog /etc/warmpod/catalog/catalog.json: not JSON",
    ),
    "catalog entry without a source": (
        lambda d: find(d, "ConfigMap")["data"].update({"catalog.json": '{"models": {"m": {"namespaces": ["*"]}}}'}),
        "model 'm': \"source\" must be the loader's SOURCE",
    ),
    "catalog file not in the ConfigMap": (
        lambda d: _set_arg(_agent(d), "--catalog", "/etc/warmpod/catalog/models.json"),
        "ConfigMap warmpod-node-catalog-",
    ),
    "CSI driver name with a slash": (
        lambda d: find(d, "CSIDriver")["metadata"].update(name="warmpod.dev/node"),
        "CSI driver name 'warmpod.dev/node': the API server wants a DNS subdomain",
    ),
    "CSI driver that needs attaching": (
        lambda d: find(d, "CSIDriver")["spec"].update(attachRequired=True),
        "attachRequired must be False",
    ),
    "CSI driver without the pod's namespace": (
        lambda d: find(d, "CSIDriver")["spec"].update(podInfoOnMount=False),
        "podInfoOnMount must be True",
    ),
    "CSI driver for persistent volumes": (
        lambda d: find(d, "CSIDriver")["spec"].update(volumeLifecycleModes=["Persistent", "Ephemeral"]),
        "volumeLifecycleModes must be ['Ephemeral']",
    ),
    "CSI driver that chowns the shared store": (
        lambda d: find(d, "CSIDriver")["spec"].update(fsGroupPolicy="File"),
        "fsGroupPolicy must be 'None'",
    ),
    "no NetworkPolicy": (
        lambda d: d.remove(find(d, "NetworkPolicy")),
        "Service/warmpod-node-peers: no NetworkPolicy selects its pods",
    ),
    "NetworkPolicy open to every source": (
        lambda d: _peer_rule(d).pop("from"),
        "NetworkPolicy/warmpod-node admits every source",
    ),
    "NetworkPolicy open to every port": (
        lambda d: _peer_rule(d).pop("ports"),
        "NetworkPolicy/warmpod-node admits every port",
    ),
    "NetworkPolicy open to another namespace": (
        lambda d: _peer_rule(d)["from"].append({"namespaceSelector": {}}),
        "admits {'namespaceSelector': {}}: only clients (pods labelled {'warmpod.dev/client': 'true'}), its own pods "
        "and monitoring may",
    ),
    "NetworkPolicy on another port": (
        lambda d: _admit_only_port(d, 9000),
        "Service/warmpod-node-peers port 8479 is not admitted by its NetworkPolicy",
    ),
    "PodMonitor scrapes an undeclared port": (
        lambda d: find(d, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(port="metrics"),
        "PodMonitor/warmpod-node scrapes port metrics, which no container declares",
    ),
}


@pytest.mark.process
@pytest.mark.parametrize("mistake", sorted(NODE_MISTAKES))
def test_each_node_agent_check_catches_its_mistake(rendered: dict[str, list[Doc]], mistake: str) -> None:
    make, message = NODE_MISTAKES[mistake]
    docs = copy.deepcopy(rendered["node"])
    make(docs)
    problems = pod_problems(docs, "node")
    assert any(message in p for p in problems), problems


def _cache_store(docs: list[Doc]) -> dict[str, Any]:
    return next(v for v in _pod(docs)["volumes"] if v["name"] == "store")


def _with_the_base_loader(docs: list[Doc], base: list[Doc]) -> None:
    loader = copy.deepcopy(_loader(base))
    loader["env"] = [{"name": "WARMPOD_SOURCE", "value": "s3://models/m"}, {"name": "WARMPOD_MODEL", "value": "m"}]
    _pod(docs)["initContainers"] = [loader]


NODE_CACHE_MISTAKES: dict[str, tuple[Callable[[list[Doc], dict[str, list[Doc]]], None], str]] = {
    "loader kept": (
        lambda d, r: _with_the_base_loader(d, r["base"]),
        "a pod on the node cache has no loader sidecar",
    ),
    "store still an emptyDir": (
        lambda d, r: _cache_store(d).update(emptyDir={"medium": "Memory", "sizeLimit": "256Mi"}),
        "the store must not be an emptyDir",
    ),
    "a tmpfs of its own": (
        lambda d, r: next(v for v in _pod(d)["volumes"] if v["name"] == "server-tmp")["emptyDir"].update(
            medium="Memory"
        ),
        "volume server-tmp: no memory-backed emptyDir",
    ),
    "another CSI driver": (
        lambda d, r: _cache_store(d)["csi"].update(driver="warmpod.dev/node"),
        "the store's CSI driver warmpod.dev/node is not node.warmpod.dev",
    ),
    "writable shared store": (
        lambda d, r: _cache_store(d)["csi"].pop("readOnly"),
        "the store's CSI volume must be readOnly: true",
    ),
    "volume for another model": (
        lambda d, r: _cache_store(d)["csi"]["volumeAttributes"].update(model="bge-small"),
        "the store volume's model bge-small is not the server's --model all-MiniLM-L6-v2",
    ),
    "server mounts the store read-write": (
        lambda d, r: containers(_pod(d))["server"].mount("store").pop("readOnly"),  # type: ignore[union-attr]
        "server must mount the store read-only",
    ),
    "store from the host": (
        lambda d, r: _pod(d)["volumes"].__setitem__(0, {"name": "store", "hostPath": {"path": "/var/lib/warmpod"}}),
        "volume store: hostPath is not allowed by the restricted profile",
    ),
    "privileged server": (
        lambda d, r: _server(d)["securityContext"].update(privileged=True),
        "container server must not be privileged",
    ),
    "server sees the node's processes": (
        lambda d, r: _pod(d).update(hostPID=True),
        "pod hostPID is not allowed by the restricted Pod Security profile",
    ),
}


@pytest.mark.process
@pytest.mark.parametrize("mistake", sorted(NODE_CACHE_MISTAKES))
def test_each_node_cache_check_catches_its_mistake(rendered: dict[str, list[Doc]], mistake: str) -> None:
    make, message = NODE_CACHE_MISTAKES[mistake]
    docs = copy.deepcopy(rendered["node-cache"])
    make(docs, rendered)
    problems = pod_problems(docs, "node-cache", node_cache=True)
    assert any(message in p for p in problems), problems


@pytest.mark.process
def test_the_node_cache_checks_are_not_the_sidecar_checks(rendered: dict[str, list[Doc]]) -> None:
    """Each render is held to its own store: the sidecar's rules fail the node-cache pod, and the node cache's
    rules fail the base's."""
    assert any("needs a `loader` and a `server`" in p for p in pod_problems(rendered["node-cache"], "node-cache"))
    assert any("has no loader sidecar" in p for p in pod_problems(rendered["base"], "base", node_cache=True))


ACROSS_MISTAKES: dict[str, tuple[Callable[[list[Doc], list[Doc]], None], str]] = {
    "model not in the catalog": (
        lambda node, cache: _cache_store(cache)["csi"]["volumeAttributes"].update(model="bge-small"),
        "model 'bge-small' is not in this node's catalog",
    ),
    "namespace the catalog does not allow": (
        lambda node, cache: find(cache, "Deployment")["metadata"].update(namespace="team-b"),
        "namespace 'team-b' may not mount model 'all-MiniLM-L6-v2'",
    ),
    "driver renamed on one side": (
        lambda node, cache: find(node, "CSIDriver")["metadata"].update(name="cache.warmpod.dev"),
        "asks for CSI driver node.warmpod.dev, but the agent's CSIDriver is cache.warmpod.dev",
    ),
    "workload in the privileged namespace": (
        lambda node, cache: find(cache, "Deployment")["metadata"].update(namespace="warmpod-system"),
        "the workload runs in the agent's privileged namespace warmpod-system",
    ),
}


@pytest.mark.process
@pytest.mark.parametrize("mistake", sorted(ACROSS_MISTAKES))
def test_each_check_across_agent_and_workload_catches_its_mistake(rendered: dict[str, list[Doc]], mistake: str) -> None:
    make, message = ACROSS_MISTAKES[mistake]
    node, cache = copy.deepcopy(rendered["node"]), copy.deepcopy(rendered["node-cache"])
    make(node, cache)
    problems = node_cache_problems(node, cache, "node+node-cache")
    assert any(message in p for p in problems), problems
