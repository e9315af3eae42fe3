"""The Kustomize tree rendered and checked: `render` runs `kubectl kustomize`; `pod_problems` and friends are pure
functions over the rendered documents that return what breaks a warmpod invariant, one message per rule
(`node_problems` for the node agent's DaemonSet, `node_cache_problems` across the agent and a workload on it)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.deploy.pod import PodSpecError, config_maps, container_port, expand, pod_containers, resolve_env

REPO = Path(__file__).parents[2]
DEPLOY = REPO / "deploy"
NODE_MODULES = REPO / ".ci" / "node" / "node_modules"
CRD_VALIDATOR = Path(__file__).with_name("crd_validate.mjs")

# Every kustomization a user can apply: the base, each overlay, the edge, the node agent.
RENDERABLE = {
    "base": DEPLOY / "base",
    **{p.name: p for p in sorted((DEPLOY / "overlays").iterdir()) if (p / "kustomization.yaml").exists()},
    "edge": DEPLOY / "edge",
    "node": DEPLOY / "node",
}
# Overlays whose store is the node agent's CSI volume rather than a loader sidecar's emptyDir.
NODE_CACHE_OVERLAYS = frozenset({"node-cache"})
# Custom resources: their schemas are not in Kubernetes' own; checked against the CRDs' (see crd_problems).
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")

Doc = dict[str, Any]


class RenderError(RuntimeError):
    pass


def render(path: Path) -> list[Doc]:
    """`kubectl kustomize PATH` as a list of documents."""
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RenderError("kubectl is not installed; it renders the Kustomize tree (kubectl kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def find(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    """The one document of `kind` (and `name`, when given)."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def is_custom_resource(doc: Doc) -> bool:
    return str(doc["apiVersion"]).startswith(CRD_GROUPS)


def crd_problems(docs: list[Doc]) -> list[str]:
    """Validate custom resources with the validators generated from their CRDs' OpenAPI schemas (npm
    kubernetes-models, installed by .ci/install-emulators.sh): types, required fields and enums, as the API
    server checks them. Like the API server's structural schemas, they do not reject unknown fields."""
    if not docs:
        return []
    node = shutil.which("node")
    if node is None or not NODE_MODULES.is_dir():
        raise RenderError("the CRD validators are missing: run `bash .ci/install-emulators.sh` (needs node and npm)")
    done = subprocess.run(
        [node, str(CRD_VALIDATOR), str(NODE_MODULES)],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RenderError(f"crd_validate.mjs failed: {done.stderr.strip()}")
    return [f"{r['kind']}/{r['name']}: {r['error']}" for r in json.loads(done.stdout) if r["error"]]


# --------------------------------------------------------------------------------------- quantities


_QUANTITY = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(text: str | int) -> int:
    """A Kubernetes memory quantity ("256Mi", "1Gi", "512M") in bytes."""
    m = _QUANTITY.match(str(text))
    if m is None:
        raise ValueError(f"not a memory quantity: {text!r}")
    return int(float(m.group(1)) * _FACTORS[m.group(2)])


# --------------------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class Container:
    spec: Doc
    sidecar: bool  # an initContainer with restartPolicy: Always

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def mount(self, volume: str) -> Doc | None:
        return next((m for m in self.spec.get("volumeMounts", []) if m["name"] == volume), None)


def containers(pod: Doc) -> dict[str, Container]:
    init = pod.get("initContainers", [])
    return {
        name: Container(spec, spec in init and spec.get("restartPolicy") == "Always")
        for name, spec in pod_containers(pod).items()
    }


def container_args(container: Doc, configmaps: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The container's args with $(VAR) expanded as the kubelet does (enough to parse them); the Secrets it reads
    are not in a render and stand in empty, and variables from the pod's fields (fieldRef) stay unexpanded."""
    secrets: dict[str, dict[str, str]] = {
        e["secretRef"]["name"]: {} for e in container.get("envFrom", []) if "secretRef" in e
    }
    known = [e for e in container.get("env", []) if "fieldRef" not in e.get("valueFrom", {})]
    env = resolve_env({**container, "env": known}, configmaps, secrets)
    return [expand(str(a), env) for a in container["args"]]


def parse_command(args: list[str]) -> tuple[str, argparse.Namespace]:
    """Parse a container's args with warmpod's own CLI parser: ("load" | "serve" | "edge serve" | "node",
    namespace)."""
    from warmpod.loader.cli import build_parser as load_parser
    from warmpod.node.cli import build_parser as node_parser
    from warmpod.server.cli import build_parser as serve_parser
    from warmpod.wasm.cli import serve_parser as edge_parser

    parsers: dict[tuple[str, ...], Callable[[], argparse.ArgumentParser]] = {
        ("load",): load_parser,
        ("serve",): serve_parser,
        ("edge", "serve"): edge_parser,
        ("node",): node_parser,
    }
    for words, parser in parsers.items():
        if tuple(args[: len(words)]) == words:
            return " ".join(words), parser().parse_args(args[len(words) :])
    raise ValueError(f"not a warmpod command: {args[:2]}")


def http_routes(command: str, ns: argparse.Namespace) -> set[str]:
    """GET paths the process behind `command` serves (from the real aiohttp apps, nothing started)."""
    from prometheus_client import CollectorRegistry

    if command == "load":
        from warmpod.loader.cli import create_app as loader_app
        from warmpod.loader.cli import parse_request

        app = loader_app(parse_request(ns), CollectorRegistry())
    elif command == "node":
        from warmpod.node.agent import NodeAgent, NodeConfig
        from warmpod.node.agent import create_app as node_app
        from warmpod.node.catalog import Catalog

        app = node_app(NodeAgent(NodeConfig(root=Path("/nonexistent"), catalog=Catalog({})), CollectorRegistry()))
    else:
        from warmpod.server.app import ServerConfig, create_app

        app = create_app(ServerConfig(model="m", store=Path("/nonexistent")), CollectorRegistry())
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}


# ------------------------------------------------------------------------------------------- checks


# Volume types the "restricted" Pod Security profile admits (image volumes since Kubernetes 1.33).
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "image",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)


def security_problems(pod: Doc, where: str) -> list[str]:
    """The "restricted" Pod Security profile plus a read-only root filesystem, for every container."""
    problems = []
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot must be true")
    if psc.get("runAsUser", 0) == 0:
        problems.append(f"{where}: pod securityContext.runAsUser must be a non-zero UID")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            problems.append(f"{where}: pod {host} is not allowed by the restricted Pod Security profile")
    for v in pod.get("volumes", []):
        kinds = sorted(set(v) - {"name"} - RESTRICTED_VOLUMES)
        if kinds:
            problems.append(f"{where}: volume {v['name']}: {', '.join(kinds)} is not allowed by the restricted profile")
    for c in containers(pod).values():
        sc = c.spec.get("securityContext", {})
        what = f"{where}: container {c.name}"
        if sc.get("privileged"):
            problems.append(f"{what} must not be privileged")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0 or sc.get("runAsNonRoot") is False:
            problems.append(f"{what} runs as root")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{what}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{what}: capabilities must drop ALL and add none")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{what}: readOnlyRootFilesystem must be true")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{what}: seccompProfile must be RuntimeDefault")
    return problems


def probe_and_port_problems(pod: Doc, configmaps: Mapping[str, Mapping[str, str]], where: str) -> list[str]:
    """Every probe's port is a declared port, the --port the process listens on (or the server's --metrics-port, which
    serves the same routes), and its path is a route of that process; the process binds all interfaces (the kubelet
    probes the pod IP)."""
    return [p for c in containers(pod).values() for p in container_probe_problems(c, configmaps, where)]


def container_probe_problems(c: Container, configmaps: Mapping[str, Mapping[str, str]], where: str) -> list[str]:
    """`probe_and_port_problems` for one container running a warmpod command."""
    problems = []
    command, ns = parse_command(container_args(c.spec, configmaps))
    declared = {p["containerPort"] for p in c.spec.get("ports", [])}
    if ns.port not in declared:
        problems.append(f"{where}: container {c.name} listens on --port {ns.port}, not a declared containerPort")
    if ns.host != "0.0.0.0":
        problems.append(f"{where}: container {c.name} binds --host {ns.host}; probes reach the pod IP")
    routes = http_routes(command, ns)
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c.spec.get(kind, {}).get("httpGet")
        if probe is None:
            continue
        try:
            port = container_port(c.spec, probe["port"])
        except PodSpecError as e:
            problems.append(f"{where}: {kind}: {e}")
            continue
        if port not in (ns.port, getattr(ns, "metrics_port", None)):
            problems.append(f"{where}: {c.name} {kind} port {probe['port']} is not the --port {ns.port}")
        if probe["path"] not in routes:
            problems.append(f"{where}: {c.name} {kind} path {probe['path']} is not a route of `warmpod {command}`")
    return problems


def store_problems(pod: Doc, configmaps: Mapping[str, Mapping[str, str]], where: str) -> list[str]:
    """The loader sidecar writes a memory-backed store the server mounts read-only, at the --store both use."""
    problems = []
    cs = containers(pod)
    loader, server = cs.get("loader"), cs.get("server")
    if loader is None or server is None:
        return [f"{where}: the pod needs a `loader` and a `server` container"]
    if not loader.sidecar or loader.spec not in pod.get("initContainers", []):
        problems.append(f"{where}: the loader must be a native sidecar (initContainers, restartPolicy: Always)")
    if server.spec not in pod["containers"]:
        problems.append(f"{where}: the server must be a main container")
    store = next((v for v in pod.get("volumes", []) if v["name"] == "store"), None)
    empty_dir = (store or {}).get("emptyDir", {})
    if empty_dir.get("medium") != "Memory":
        problems.append(f"{where}: the store volume must be an emptyDir with medium: Memory")
    if "sizeLimit" not in empty_dir:
        problems.append(f"{where}: the store emptyDir needs a sizeLimit (the tmpfs size)")
    for c, read_only in ((loader, False), (server, True)):
        mount = c.mount("store")
        if mount is None:
            problems.append(f"{where}: {c.name} does not mount the store")
            continue
        if bool(mount.get("readOnly")) != read_only:
            problems.append(f"{where}: {c.name} must mount the store {'read-only' if read_only else 'read-write'}")
        _, ns = parse_command(container_args(c.spec, configmaps))
        if str(ns.store) != mount["mountPath"]:
            problems.append(f"{where}: {c.name} uses --store {ns.store} but mounts the store at {mount['mountPath']}")
    if problems:
        return problems
    _, load = parse_command(container_args(loader.spec, configmaps))
    _, serve = parse_command(container_args(server.spec, configmaps))
    if load.model != serve.model:
        problems.append(f"{where}: loader --model {load.model} and server --model {serve.model} differ")
    if load.watch is None:
        problems.append(f"{where}: the sidecar must --watch (it keeps running and publishes new versions)")
    limit = quantity(loader.spec.get("resources", {}).get("limits", {}).get("memory", 0))
    needed = quantity(empty_dir["sizeLimit"]) + load.max_buffer
    if limit < needed:
        problems.append(
            f"{where}: loader memory limit {limit} B < store sizeLimit + --max-buffer = {needed} B "
            "(the tmpfs pages it writes are charged to it)"
        )
    return problems


def shutdown_problems(
    pod: Doc, configmaps: Mapping[str, Mapping[str, str]], where: str, sidecar_s: int = 5
) -> list[str]:
    """terminationGracePeriodSeconds covers the server's preStop sleep, its drain and the sidecar's stop."""
    server = containers(pod)["server"]
    _, ns = parse_command(container_args(server.spec, configmaps))
    pre_stop = server.spec.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    needed = pre_stop + ns.drain_grace + sidecar_s
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < needed:
        drain = f"preStop {pre_stop} + drain {ns.drain_grace:g} + {sidecar_s}"
        return [f"{where}: terminationGracePeriodSeconds {grace} < {drain}"]
    return []


def wiring_problems(docs: list[Doc], where: str) -> list[str]:
    """Service, PodDisruptionBudget, PodMonitor and autoscalers point at the Deployment's pods and ports."""
    problems = []
    deployment = next(d for d in docs if d["kind"] in ("Deployment", "DaemonSet"))
    name, namespace = deployment["metadata"]["name"], deployment["metadata"].get("namespace")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for c in containers(pod["spec"]).values() for p in c.spec.get("ports", [])}

    def selects(selector: Mapping[str, str], what: str) -> None:
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{where}: {what} selector {dict(selector)} does not select the pods {labels}")

    for d in docs:
        kind, what = d["kind"], f"{d['kind']}/{d['metadata']['name']}"
        if kind == "Service":
            selects(d["spec"]["selector"], what)
            for p in d["spec"]["ports"]:
                if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                    problems.append(f"{where}: {what} targetPort {p['targetPort']} is no container port")
        elif kind == "PodDisruptionBudget":
            selects(d["spec"]["selector"]["matchLabels"], what)
        elif kind == "PodMonitor":
            selects(d["spec"]["selector"]["matchLabels"], what)
            for e in d["spec"]["podMetricsEndpoints"]:
                if e["port"] not in ports:
                    problems.append(f"{where}: {what} scrapes port {e['port']}, which no container declares")
        elif kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            if d["spec"]["scaleTargetRef"]["name"] != name:
                problems.append(f"{where}: {what} scales {d['spec']['scaleTargetRef']['name']}, not {name}")
            if d["metadata"].get("namespace") != namespace:
                problems.append(f"{where}: {what} is not in the Deployment's namespace {namespace}")
            if "replicas" in deployment["spec"]:
                problems.append(f"{where}: with {what}, the Deployment must not set replicas (each apply resets them)")
            if kind == "ScaledObject":
                for t in d["spec"]["triggers"]:
                    if f'namespace="{namespace}"' not in t["metadata"]["query"]:
                        problems.append(f"{where}: {what} query does not select namespace {namespace}")
    return problems


def pod_problems(docs: list[Doc], where: str, *, node_cache: bool = False) -> list[str]:
    """Everything above, for one rendered kustomization holding a warmpod Deployment (or the edge DaemonSet); the
    node agent's render (it has the CSIDriver) gets `node_problems` instead. `node_cache`: the Deployment's store is
    the node agent's volume (NODE_CACHE_OVERLAYS), not a loader sidecar's. Every render gets the tenancy rules
    (tests.deploy.tenancy: network policies, user namespaces, the API-key door, the metrics port, TLS)."""
    from tests.deploy.tenancy import tenancy_problems

    if any(d["kind"] == "CSIDriver" for d in docs):
        return node_problems(docs, where) + tenancy_problems(docs, where)
    workload = next((d for d in docs if d["kind"] in ("Deployment", "DaemonSet")), None)
    if workload is None:
        return [f"{where}: no Deployment or DaemonSet"]
    pod = workload["spec"]["template"]["spec"]
    cms = config_maps(docs)
    problems = security_problems(pod, where) + probe_and_port_problems(pod, cms, where) + wiring_problems(docs, where)
    problems += tenancy_problems(docs, where)
    if workload["kind"] == "Deployment":
        problems += node_store_problems(pod, cms, where) if node_cache else store_problems(pod, cms, where)
        problems += shutdown_problems(pod, cms, where) if "server" in containers(pod) else []
    return problems


# ------------------------------------------------------------------------------------------- the node cache

# The CSI driver: the CSIDriver object's name, a pod volume's `csi.driver` and the agent's GetPluginInfo name.
NODE_DRIVER = "node.warmpod.dev"
# What the API server requires of a CSI driver name, in a CSIDriver and in a pod's csi volume alike
# (ValidateCSIDriverName): at most 63 characters, a DNS-1123 subdomain once lowercased; so no "/".
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# The agent's memory besides its tmpfs: the loader's range buffer while it stages (the loader's default, which the
# agent uses) and the Python process (aiohttp, s3fs/botocore, grpcio).
AGENT_PROCESS_BYTES = 160 << 20
# Namespaces whose scrapers may reach the ports a PodMonitor scrapes (the agent's: the peer routes need the token).
MONITORING_NAMESPACES = frozenset({"monitoring"})


def csi_driver_name_problems(name: str) -> list[str]:
    if len(name) > 63 or not _DNS1123_SUBDOMAIN.match(name.lower()):
        return [f"CSI driver name {name!r}: the API server wants a DNS subdomain of at most 63 characters"]
    return []


def go_flag(args: list[str], name: str) -> str | None:
    """The value of a Go-style flag (`--name=value`, `--name value`, one dash or two), None if absent."""
    for i, a in enumerate(args):
        flag, eq, value = a.lstrip("-").partition("=")
        if a.startswith("-") and flag == name:
            return value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return None


def mount_at(c: Container, path: str | Path) -> Doc | None:
    """The container's volumeMount that holds `path` (the deepest one)."""
    path = str(path)

    def holds(mount: Doc) -> bool:
        root = str(mount["mountPath"]).rstrip("/")
        return path == root or path.startswith(root + "/")

    return max(filter(holds, c.spec.get("volumeMounts", [])), key=lambda m: len(m["mountPath"]), default=None)


def host_path(c: Container, path: str | Path, volumes: Mapping[str, Doc]) -> str | None:
    """Where `path` in the container is on the node: through a hostPath volume's mount, None otherwise."""
    mount = mount_at(c, path)
    source = volumes.get(mount["name"], {}).get("hostPath") if mount else None
    if mount is None or source is None:
        return None
    return str(source["path"]).rstrip("/") + str(path)[len(mount["mountPath"].rstrip("/")) :]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class NodeAgentPod:
    """The node agent's DaemonSet as the checks see it: its pod, the `warmpod node` container and its parsed
    flags, the registrar, the volumes by name."""

    daemonset: Doc
    agent: Container
    flags: argparse.Namespace
    registrar: Container | None
    volumes: dict[str, Doc]

    @property
    def pod(self) -> Doc:
        pod: Doc = self.daemonset["spec"]["template"]["spec"]
        return pod

    @property
    def namespace(self) -> str:
        return str(self.daemonset["metadata"].get("namespace"))

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.daemonset["spec"]["template"]["metadata"]["labels"])


def node_agent_pod(docs: list[Doc]) -> NodeAgentPod:
    """The DaemonSet running `warmpod node` in a render (LookupError if there is none)."""
    for d in docs:
        if d["kind"] != "DaemonSet":
            continue
        cs = containers(d["spec"]["template"]["spec"])
        agent = next((c for c in cs.values() if c.spec.get("args", [])[:1] == ["node"]), None)
        if agent is None:
            continue
        registrar = next((c for c in cs.values() if "csi-node-driver-registrar" in c.spec["image"]), None)
        _, flags = parse_command(container_args(agent.spec, config_maps(docs)))
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"].get("volumes", [])}
        return NodeAgentPod(d, agent, flags, registrar, volumes)
    raise LookupError("no DaemonSet runs `warmpod node`")


def agent_catalog_text(docs: list[Doc], node: NodeAgentPod) -> str:
    """The catalog file the agent reads (--catalog), from the ConfigMap mounted there; LookupError says why not."""
    mount = mount_at(node.agent, node.flags.catalog)
    source = node.volumes.get(mount["name"], {}).get("configMap") if mount else None
    if mount is None or source is None:
        raise LookupError(f"--catalog {node.flags.catalog} is not on a ConfigMap volume")
    key = str(node.flags.catalog)[len(mount["mountPath"].rstrip("/")) + 1 :]
    key = next((item["key"] for item in source.get("items", []) if item["path"] == key), key)
    data = config_maps(docs).get(source["name"])
    if data is None or key not in data:
        raise LookupError(f"--catalog {node.flags.catalog}: ConfigMap {source['name']} has no key {key!r}")
    return data[key]


def node_privilege_problems(docs: list[Doc], node: NodeAgentPod, where: str) -> list[str]:
    """Only the agent is privileged (mount(2), Bidirectional propagation), in the only privileged namespace."""
    problems = []
    for d in docs:
        if d["kind"] != "Namespace":
            continue
        level = d["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
        if d["metadata"]["name"] == node.namespace and level != "privileged":
            problems.append(
                f"{where}: namespace {node.namespace} must enforce privileged: nothing less admits the agent"
            )
        if d["metadata"]["name"] != node.namespace and level != "restricted":
            problems.append(
                f"{where}: namespace {d['metadata']['name']} must enforce restricted; only the agent's is privileged"
            )
    if not any(d["kind"] == "Namespace" and d["metadata"]["name"] == node.namespace for d in docs):
        problems.append(f"{where}: the agent's namespace {node.namespace} is not in the render (its PSA labels are)")
    sc = node.agent.spec.get("securityContext", {})
    if sc.get("privileged") is not True:
        problems.append(f"{where}: the agent must be privileged: mount(2) and Bidirectional mount propagation")
    if sc.get("runAsUser") != 0:
        problems.append(f"{where}: the agent must run as root (runAsUser: 0): mount(2) needs it")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: container {node.agent.name}: readOnlyRootFilesystem must be true")
    for c in containers(node.pod).values():
        if c.name == node.agent.name:
            continue
        csc = c.spec.get("securityContext", {})
        what = f"{where}: container {c.name}"
        if csc.get("privileged"):
            problems.append(f"{what} must not be privileged: only the agent mounts")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{what}: allowPrivilegeEscalation must be false")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []) or csc.get("capabilities", {}).get("add"):
            problems.append(f"{what}: capabilities must drop ALL and add none")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{what}: readOnlyRootFilesystem must be true")
        for m in c.spec.get("volumeMounts", []):
            if m.get("mountPropagation") == "Bidirectional":
                problems.append(f"{what} must not mount {m['mountPath']} Bidirectional: only the agent mounts")
    if node.pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: the agent pod needs no Kubernetes API token (automountServiceAccountToken: false)")
    return problems


def node_mount_problems(node: NodeAgentPod, where: str) -> list[str]:
    """The kubelet directory at its own path, Bidirectional; the node store on the host, Bidirectional; one CSI
    socket that the agent serves, the registrar dials and the kubelet is told of."""
    problems = []
    kubelet_dir = str(node.flags.kubelet_dir)
    mount = next((m for m in node.agent.spec.get("volumeMounts", []) if m["mountPath"] == kubelet_dir), None)
    if mount is None or host_path(node.agent, kubelet_dir, node.volumes) != kubelet_dir:
        problems.append(
            f"{where}: the agent must mount the host's {kubelet_dir} at {kubelet_dir} (--kubelet-dir): the kubelet "
            "hands it host paths"
        )
    elif mount.get("mountPropagation") != "Bidirectional":
        problems.append(
            f"{where}: the kubelet dir must be mounted with mountPropagation: Bidirectional (the binds into pods' "
            "volumes must reach the host)"
        )
    if node.flags.tmpfs:
        store = mount_at(node.agent, node.flags.root)
        if host_path(node.agent, node.flags.root, node.volumes) is None or store is None:
            problems.append(f"{where}: --root {node.flags.root} must be on a hostPath volume (the node store)")
        elif store.get("mountPropagation") != "Bidirectional":
            problems.append(
                f"{where}: --root {node.flags.root} must be mounted Bidirectional: the agent's tmpfs and its volume "
                "records must outlive the container"
            )
    if node.flags.csi_socket is None:
        return [*problems, f"{where}: the agent has no --csi-socket: it is no CSI plugin"]
    socket = host_path(node.agent, node.flags.csi_socket, node.volumes)
    if socket is None:
        return [*problems, f"{where}: --csi-socket {node.flags.csi_socket} is not on a hostPath volume"]
    if not socket.startswith(f"{kubelet_dir}/plugins/"):
        problems.append(f"{where}: the CSI socket {socket} is not under {kubelet_dir}/plugins/")
    if node.registrar is None:
        return [*problems, f"{where}: no node-driver-registrar container: the kubelet never learns of the plugin"]
    args = [str(a) for a in node.registrar.spec.get("args", [])]
    registered = go_flag(args, "kubelet-registration-path")
    if registered != socket:
        problems.append(
            f"{where}: the agent's --csi-socket {node.flags.csi_socket} is {socket} on the host, but the registrar's "
            f"--kubelet-registration-path is {registered}"
        )
    address = go_flag(args, "csi-address")
    dialled = host_path(node.registrar, address, node.volumes) if address else None
    if dialled != socket:
        problems.append(
            f"{where}: the registrar's --csi-address {address} is {dialled} on the host, not the agent's socket "
            f"{socket}"
        )
    registration = mount_at(node.registrar, "/registration")
    if registration is None or host_path(node.registrar, "/registration", node.volumes) != (
        f"{kubelet_dir}/plugins_registry"
    ):
        problems.append(f"{where}: the registrar must mount the host's {kubelet_dir}/plugins_registry at /registration")
    return problems


def node_memory_problems(node: NodeAgentPod, where: str) -> list[str]:
    """The tmpfs pages are charged to the agent: its limit covers --max-bytes and the process."""
    from warmpod.loader.plan import DEFAULT_MAX_BUFFER_BYTES

    resources = node.agent.spec.get("resources", {})
    limit = quantity(resources.get("limits", {}).get("memory", 0))
    if node.flags.max_bytes is None:
        return [f"{where}: the agent needs --max-bytes (its tmpfs size and its budget)"]
    needed = node.flags.max_bytes + DEFAULT_MAX_BUFFER_BYTES + AGENT_PROCESS_BYTES
    problems = []
    if limit < needed:
        problems.append(
            f"{where}: agent memory limit {limit} B < --max-bytes + the loader's buffer + the process = {needed} B "
            "(the tmpfs pages are charged to it)"
        )
    if resources.get("requests", {}).get("memory") != resources.get("limits", {}).get("memory"):
        problems.append(f"{where}: the agent's memory request must equal its limit (the node's models are RAM)")
    return problems


def node_schedule_problems(docs: list[Doc], node: NodeAgentPod, where: str) -> list[str]:
    """On every node, before anything else (admitted where critical classes need a quota), one node at a time; the
    node's processes and name visible."""
    problems = []
    pod, spec = node.pod, node.daemonset["spec"]
    if pod.get("priorityClassName") != "system-node-critical":
        problems.append(f"{where}: the agent's priorityClassName must be system-node-critical")
    permits = [
        e
        for d in docs
        if d["kind"] == "ResourceQuota" and d["metadata"].get("namespace") == node.namespace
        for e in d["spec"].get("scopeSelector", {}).get("matchExpressions", [])
        if e.get("scopeName") == "PriorityClass" and e.get("operator") == "In"
    ]
    if not any(pod.get("priorityClassName") in e.get("values", []) for e in permits):
        problems.append(
            f"{where}: no ResourceQuota in {node.namespace} covers the agent's priority class (clusters that limit "
            "critical classes to kube-system refuse the pods)"
        )
    if not any(
        t.get("operator") == "Exists" and "key" not in t and "effect" not in t for t in pod.get("tolerations", [])
    ):
        problems.append(
            f"{where}: the agent must tolerate every taint (operator: Exists, no key): a pod on any node may mount"
        )
    strategy = spec.get("updateStrategy", {})
    if strategy.get("type") != "RollingUpdate" or strategy.get("rollingUpdate", {}).get("maxUnavailable") != 1:
        problems.append(f"{where}: the DaemonSet's updateStrategy must be RollingUpdate with maxUnavailable: 1")
    if pod.get("hostPID") is not True:
        problems.append(f"{where}: the agent needs hostPID: it reads every process's maps before evicting a version")
    node_name: Doc = next((e for e in node.agent.spec.get("env", []) if e["name"] == "NODE_NAME"), {})
    if node_name.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problems.append(f"{where}: NODE_NAME must come from the pod's spec.nodeName (the CSI node id)")
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/ready")):
        if node.agent.spec.get(kind, {}).get("httpGet", {}).get("path") != path:
            problems.append(f"{where}: the agent's {kind} must be GET {path}")
    return problems


def peer_problems(docs: list[Doc], node: NodeAgentPod, where: str) -> list[str]:
    """--peers name a headless Service of the agents (ready ones only) on their port; the token is a Secret the
    render does not carry (never committed)."""
    problems = []
    for url in node.flags.peers:
        parts = urlsplit(url)
        host = (parts.hostname or "").removesuffix(".cluster.local").split(".")
        if len(host) != 3 or host[2] != "svc":
            problems.append(f"{where}: --peers {url}: not a Service's DNS name (NAME.NAMESPACE.svc)")
            continue
        service = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host[0]
                        and d["metadata"].get("namespace") == host[1]), None)  # fmt: skip
        what = f"Service/{host[0]}"
        if service is None:
            problems.append(f"{where}: --peers {url}: no {what} in namespace {host[1]}")
            continue
        spec = service["spec"]
        if spec.get("clusterIP") != "None":
            problems.append(f"{where}: {what} must be headless (clusterIP: None): its name resolves to each agent")
        if spec.get("publishNotReadyAddresses"):
            problems.append(f"{where}: {what} must not publish not-ready agents as peers")
        if not selects(spec.get("selector", {}), node.labels):
            problems.append(f"{where}: {what} does not select the agent pods")
        port = next((p for p in spec["ports"] if p["port"] == parts.port), None)
        if port is None:
            problems.append(f"{where}: --peers {url}: port {parts.port} is not a port of {what}")
        elif container_port(node.agent.spec, port.get("targetPort", port["port"])) != node.flags.port:
            problems.append(f"{where}: {what} port {port['port']} does not reach the agent's --port {node.flags.port}")
    if node.flags.peer_token_file is None:
        return problems + ([f"{where}: --peers without --peer-token-file"] if node.flags.peers else [])
    mount = mount_at(node.agent, node.flags.peer_token_file)
    secret = node.volumes.get(mount["name"], {}).get("secret") if mount else None
    if secret is None or not mount or mount.get("readOnly") is not True:
        problems.append(f"{where}: --peer-token-file {node.flags.peer_token_file} must be on a read-only Secret volume")
    elif any(d["kind"] == "Secret" and d["metadata"]["name"] == secret["secretName"] for d in docs):
        problems.append(f"{where}: the peer token Secret {secret['secretName']} must not be in the render: create it")
    return problems


def catalog_problems(docs: list[Doc], node: NodeAgentPod, where: str) -> list[str]:
    """The agent's --catalog is a ConfigMap's file that warmpod.node.catalog parses."""
    from warmpod.errors import UsageError
    from warmpod.node.catalog import parse_catalog

    try:
        parse_catalog(agent_catalog_text(docs, node), f"--catalog {node.flags.catalog}")
    except (LookupError, UsageError) as e:
        return [f"{where}: {e}"]
    return []


def csidriver_problems(docs: list[Doc], where: str) -> list[str]:
    """The CSIDriver object: warmpod's name, inline ephemeral volumes only, no attach, the pod's namespace passed."""
    try:
        driver = find(docs, "CSIDriver")
    except LookupError as e:
        return [f"{where}: {e}"]
    name, spec = driver["metadata"]["name"], driver["spec"]
    problems = [f"{where}: {p}" for p in csi_driver_name_problems(name)]
    if name != NODE_DRIVER:
        problems.append(f"{where}: CSIDriver {name} is not {NODE_DRIVER}, the name the agent registers")
    wanted = {"attachRequired": False, "podInfoOnMount": True, "volumeLifecycleModes": ["Ephemeral"],
              "fsGroupPolicy": "None", "requiresRepublish": False}  # fmt: skip
    for key, value in wanted.items():
        if spec.get(key) != value:
            problems.append(f"{where}: CSIDriver {name} {key} must be {value!r}, not {spec.get(key)!r}")
    return problems


def node_problems(docs: list[Doc], where: str) -> list[str]:
    """Every invariant of the node agent's render (deploy/node)."""
    try:
        node = node_agent_pod(docs)
    except LookupError as e:
        return [f"{where}: {e}"]
    return (
        node_privilege_problems(docs, node, where)
        + container_probe_problems(node.agent, config_maps(docs), where)
        + node_mount_problems(node, where)
        + node_memory_problems(node, where)
        + node_schedule_problems(docs, node, where)
        + peer_problems(docs, node, where)
        + catalog_problems(docs, node, where)
        + csidriver_problems(docs, where)
        + wiring_problems(docs, where)
    )


def node_store_problems(pod: Doc, configmaps: Mapping[str, Mapping[str, str]], where: str) -> list[str]:
    """A workload on the node cache: no loader, no memory-backed store of its own; the store is the agent's
    read-only CSI volume holding the server's --model, mounted read-only at its --store."""
    problems = []
    cs = containers(pod)
    if "loader" in cs or any(c.sidecar for c in cs.values()):
        problems.append(f"{where}: a pod on the node cache has no loader sidecar: the node agent stages the model")
    for v in pod.get("volumes", []):
        if v.get("emptyDir", {}).get("medium") == "Memory":
            problems.append(
                f"{where}: volume {v['name']}: no memory-backed emptyDir, the model's pages are the agent's"
            )
    server = cs.get("server")
    store = next((v for v in pod.get("volumes", []) if v["name"] == "store"), None)
    if server is None or store is None:
        return [*problems, f"{where}: the pod needs a `server` container and a `store` volume"]
    if "emptyDir" in store:
        problems.append(f"{where}: the store must not be an emptyDir: it is the node agent's CSI volume")
    csi = store.get("csi")
    if csi is None:
        return [*problems, f"{where}: the store volume must be a CSI ephemeral volume of {NODE_DRIVER}"]
    if csi.get("driver") != NODE_DRIVER:
        problems.append(f"{where}: the store's CSI driver {csi.get('driver')} is not {NODE_DRIVER}")
    if csi.get("readOnly") is not True:
        problems.append(f"{where}: the store's CSI volume must be readOnly: true (every pod on the node shares it)")
    mount = server.mount("store")
    _, serve = parse_command(container_args(server.spec, configmaps))
    if mount is None or mount.get("readOnly") is not True:
        problems.append(f"{where}: server must mount the store read-only")
    elif str(serve.store) != mount["mountPath"]:
        problems.append(f"{where}: server uses --store {serve.store} but mounts the store at {mount['mountPath']}")
    model = csi.get("volumeAttributes", {}).get("model")
    if model != serve.model:
        problems.append(f"{where}: the store volume's model {model} is not the server's --model {serve.model}")
    return problems


def node_cache_problems(node_docs: list[Doc], workload_docs: list[Doc], where: str) -> list[str]:
    """A workload on the node cache against the agent it relies on: its volumes name the agent's CSIDriver, its
    model is in the agent's catalog for its namespace, and it stays in a restricted namespace of its own."""
    from warmpod.node.catalog import parse_catalog
    from warmpod.node.errors import NodeError

    problems = []
    driver = find(node_docs, "CSIDriver")["metadata"]["name"]
    node = node_agent_pod(node_docs)
    catalog = parse_catalog(agent_catalog_text(node_docs, node))
    for workload in (d for d in workload_docs if d["kind"] in ("Deployment", "DaemonSet")):
        namespace = workload["metadata"].get("namespace")
        if namespace == node.namespace:
            problems.append(f"{where}: the workload runs in the agent's privileged namespace {namespace}")
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "csi" not in volume:
                continue
            if volume["csi"].get("driver") != driver:
                problems.append(f"{where}: volume {volume['name']} asks for CSI driver {volume['csi'].get('driver')}, "
                                f"but the agent's CSIDriver is {driver}")  # fmt: skip
            try:
                catalog.entry(str(volume["csi"].get("volumeAttributes", {}).get("model")), namespace)
            except NodeError as e:
                problems.append(f"{where}: volume {volume['name']}: {e}")
    return problems
