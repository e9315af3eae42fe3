"""The Kustomize tree rendered and checked: `render` runs `kubectl kustomize`; `pod_problems` and friends are pure
functions over the rendered documents that return what breaks a warmpod invariant, one message per rule."""

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

from tests.deploy.pod import PodSpecError, config_maps, container_port, expand, pod_containers, resolve_env

REPO = Path(__file__).parents[2]
DEPLOY = REPO / "deploy"
NODE_MODULES = REPO / ".ci" / "node" / "node_modules"
CRD_VALIDATOR = Path(__file__).with_name("crd_validate.mjs")

# Every kustomization a user can apply: the base, each overlay, the edge.
RENDERABLE = {
    "base": DEPLOY / "base",
    **{p.name: p for p in sorted((DEPLOY / "overlays").iterdir()) if (p / "kustomization.yaml").exists()},
    "edge": DEPLOY / "edge",
}
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
    are not in a render and stand in empty."""
    secrets: dict[str, dict[str, str]] = {
        e["secretRef"]["name"]: {} for e in container.get("envFrom", []) if "secretRef" in e
    }
    env = resolve_env(container, configmaps, secrets)
    return [expand(str(a), env) for a in container["args"]]


def parse_command(args: list[str]) -> tuple[str, argparse.Namespace]:
    """Parse a container's args with warmpod's own CLI parser: ("load" | "serve" | "edge serve", namespace)."""
    from warmpod.loader.cli import build_parser as load_parser
    from warmpod.server.cli import build_parser as serve_parser
    from warmpod.wasm.cli import serve_parser as edge_parser

    parsers: dict[tuple[str, ...], Callable[[], argparse.ArgumentParser]] = {
        ("load",): load_parser,
        ("serve",): serve_parser,
        ("edge", "serve"): edge_parser,
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
    else:
        from warmpod.server.app import ServerConfig, create_app

        app = create_app(ServerConfig(model="m", store=Path("/nonexistent")), CollectorRegistry())
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}


# ------------------------------------------------------------------------------------------- checks


def security_problems(pod: Doc, where: str) -> list[str]:
    """The "restricted" Pod Security profile plus a read-only root filesystem, for every container."""
    problems = []
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot must be true")
    if psc.get("runAsUser", 0) == 0:
        problems.append(f"{where}: pod securityContext.runAsUser must be a non-zero UID")
    for c in containers(pod).values():
        sc = c.spec.get("securityContext", {})
        what = f"{where}: container {c.name}"
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
    """Every probe's port is a declared port, equal to the --port the process listens on, and its path is a route
    of that process; the process binds all interfaces (the kubelet probes the pod IP)."""
    problems = []
    for c in containers(pod).values():
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
            if port != ns.port:
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


def pod_problems(docs: list[Doc], where: str) -> list[str]:
    """Everything above, for one rendered kustomization holding a warmpod Deployment (or the edge DaemonSet)."""
    workload = next((d for d in docs if d["kind"] in ("Deployment", "DaemonSet")), None)
    if workload is None:
        return [f"{where}: no Deployment or DaemonSet"]
    pod = workload["spec"]["template"]["spec"]
    cms = config_maps(docs)
    problems = security_problems(pod, where) + probe_and_port_problems(pod, cms, where) + wiring_problems(docs, where)
    if workload["kind"] == "Deployment":
        problems += store_problems(pod, cms, where)
        problems += shutdown_problems(pod, cms, where) if "server" in containers(pod) else []
    return problems
