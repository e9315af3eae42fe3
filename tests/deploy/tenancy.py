"""The rendered tree's tenancy invariants (issue 15), pure functions over `kubectl kustomize` output like those of
tests.deploy.manifests, one message per rule broken:

- `network_policy_problems`: every Service's pods sit behind a NetworkPolicy that admits clients (pods labelled
  CLIENT_LABEL) or the pods themselves to the Service's ports only, and the monitoring namespace to the ports a
  PodMonitor scrapes only;
- `user_namespace_problems`: every workload pod runs in a user namespace (hostUsers: false), but the node agent, for
  the reason in HOST_USERS_EXEMPT;
- `door_problems`: a server that binds beyond loopback reads its API keys from a Secret mounted whole (a rotation
  reaches it), and never runs --allow-unauthenticated;
- `metrics_port_problems`: Prometheus scrapes a server on its own metrics port, bound where the pod IP reaches it;
- `tls_problems` and `pod_certificate_problems`: a TLS server reads its certificate and key from one podCertificate
  (or Secret) volume mounted whole, and its probes speak HTTPS to the TLS port only.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from tests.deploy.manifests import (
    MONITORING_NAMESPACES,
    Container,
    Doc,
    container_args,
    containers,
    mount_at,
    parse_command,
    selects,
)
from tests.deploy.pod import PodSpecError, config_maps, container_port

# The label a pod carries to be admitted to the serving ports (deploy/*/networkpolicy.yaml, docs/kubernetes.md).
CLIENT_LABEL = {"warmpod.dev/client": "true"}
# Workloads that keep the host's user namespace, and why (docs/kubernetes.md, "User namespaces").
HOST_USERS_EXEMPT = {
    "warmpod-node": "the node agent needs hostPID, which the API refuses beside hostUsers: false, and mounts into "
    "the host's mount namespace as the host's root (mount(2), Bidirectional propagation), which the root of a user "
    "namespace is not",
}
# The commands that serve clients: they take --api-key-file, --metrics-port and the TLS flags.
SERVING_COMMANDS = frozenset({"serve", "edge serve"})
# IDs a user namespace maps: the pod's UIDs and GIDs must lie in 0-65535.
USER_NAMESPACE_IDS = 65536
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# What the API server accepts in a podCertificate projection (the schema checks types only).
POD_CERTIFICATE_KEY_TYPES = frozenset({"RSA3072", "RSA4096", "ECDSAP256", "ECDSAP384", "ECDSAP521", "ED25519"})
POD_CERTIFICATE_LIFETIME_S = (3600, 7862400)  # 1 hour to 91 days
_SIGNER = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9._/-]+$")


@dataclass(frozen=True)
class Workload:
    """A Deployment or DaemonSet as these checks see it."""

    doc: Doc

    @property
    def what(self) -> str:
        return f"{self.doc['kind']}/{self.doc['metadata']['name']}"

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        namespace = self.doc["metadata"].get("namespace")
        return None if namespace is None else str(namespace)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.doc["spec"]["template"]["metadata"]["labels"])

    @property
    def pod(self) -> Doc:
        pod: Doc = self.doc["spec"]["template"]["spec"]
        return pod

    @property
    def volumes(self) -> dict[str, Doc]:
        return {v["name"]: v for v in self.pod.get("volumes", [])}

    def port_numbers(self, port: int | str) -> set[int]:
        """The container port numbers a Service's targetPort or a policy's port names (numbers name themselves)."""
        numbers = set()
        for c in containers(self.pod).values():
            with contextlib.suppress(PodSpecError):
                numbers.add(container_port(c.spec, port))
        return numbers


def workloads(docs: list[Doc]) -> list[Workload]:
    return [Workload(d) for d in docs if d["kind"] in ("Deployment", "DaemonSet")]


@dataclass(frozen=True)
class Serving:
    """A container running `warmpod serve` or `warmpod edge serve`, its flags parsed by warmpod's own parser."""

    workload: Workload
    container: Container
    command: str
    flags: argparse.Namespace

    @property
    def what(self) -> str:
        return f"container {self.container.name}"

    @property
    def metrics_port(self) -> int | None:
        port = getattr(self.flags, "metrics_port", None)
        return None if port is None else int(port)

    def probes(self) -> Iterator[tuple[str, Doc, int | None]]:
        """(kind, httpGet, the port number it reaches or None) for each HTTP probe."""
        for kind in PROBES:
            get = self.container.spec.get(kind, {}).get("httpGet")
            if get is None:
                continue
            try:
                yield kind, get, container_port(self.container.spec, get["port"])
            except PodSpecError:
                yield kind, get, None  # container_probe_problems says so


def serving_containers(docs: list[Doc]) -> list[Serving]:
    cms = config_maps(docs)
    found = []
    for w in workloads(docs):
        for c in containers(w.pod).values():
            try:
                command, flags = parse_command(container_args(c.spec, cms))
            except ValueError:  # not a warmpod command (the CSI registrar)
                continue
            if command in SERVING_COMMANDS:
                found.append(Serving(w, c, command, flags))
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pod_monitor_ports(docs: list[Doc], w: Workload) -> dict[int, list[Doc]]:
    """The container port numbers each PodMonitor selecting the workload's pods scrapes: number -> endpoints."""
    scraped: dict[int, list[Doc]] = {}
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        if monitor["metadata"].get("namespace") != w.namespace:
            continue
        if not selects(monitor["spec"]["selector"].get("matchLabels", {}), w.labels):
            continue
        for endpoint in monitor["spec"].get("podMetricsEndpoints", []):
            for number in w.port_numbers(endpoint["port"]):
                scraped.setdefault(number, []).append(endpoint)
    return scraped


# ------------------------------------------------------------------------------------------ network policies


def _peer_kind(peer: Doc, labels: Mapping[str, str]) -> str | None:
    """The peer's kind: "monitoring", "clients", "own pods", or None for one these manifests never admit."""
    namespaces = peer.get("namespaceSelector")
    pods = peer.get("podSelector")
    if "ipBlock" in peer:
        return None
    if pods is None:
        if namespaces is None or namespaces.get("matchExpressions"):
            return None
        names = namespaces.get("matchLabels", {})
        only_name = set(names) == {"kubernetes.io/metadata.name"}
        return "monitoring" if only_name and names["kubernetes.io/metadata.name"] in MONITORING_NAMESPACES else None
    if pods.get("matchExpressions"):
        return None
    if pods.get("matchLabels") == CLIENT_LABEL:
        return "clients"
    if namespaces is None and selects(pods.get("matchLabels", {}), labels):
        return "own pods"
    return None


def network_policy_problems(docs: list[Doc], where: str) -> list[str]:
    """Every Service's pods are selected by an Ingress NetworkPolicy in their namespace whose rules admit only:
    clients (pods labelled CLIENT_LABEL, from any namespace the rule's namespaceSelector picks) and the pods
    themselves, to the Service's ports; the monitoring namespace, to the ports a PodMonitor scrapes. Every Service
    port is open to one of the former, every scraped port to monitoring."""
    problems = []
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for service in (d for d in docs if d["kind"] == "Service"):
        what, namespace = f"Service/{service['metadata']['name']}", service["metadata"].get("namespace")
        w = next((w for w in workloads(docs) if selects(service["spec"].get("selector", {}), w.labels)), None)
        if w is None:
            continue  # wiring_problems says so
        guarding = [p for p in policies if p["metadata"].get("namespace") == namespace
                    and selects(p["spec"]["podSelector"].get("matchLabels", {}), w.labels)
                    and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]  # fmt: skip
        if not guarding:
            problems.append(f"{where}: {what}: no NetworkPolicy selects its pods")
            continue
        serving = {n for p in service["spec"]["ports"] for n in w.port_numbers(p.get("targetPort", p["port"]))}
        scraped = set(pod_monitor_ports(docs, w))
        admitted: dict[str, set[int]] = {"clients": set(), "own pods": set(), "monitoring": set()}
        for policy in guarding:
            name = f"NetworkPolicy/{policy['metadata']['name']}"
            for rule in policy["spec"].get("ingress", []):
                if not rule.get("from"):
                    problems.append(f"{where}: {name} admits every source")
                if not rule.get("ports"):
                    problems.append(f"{where}: {name} admits every port")
                numbers: set[int] = set()
                for port in rule.get("ports", []):
                    found = w.port_numbers(port["port"])
                    if not found:
                        problems.append(f"{where}: {name} admits port {port['port']}, which no container declares")
                    numbers |= found
                for peer in rule.get("from", []):
                    kind = _peer_kind(peer, w.labels)
                    if kind is None:
                        problems.append(f"{where}: {name} admits {peer}: only clients (pods labelled "
                                        f"{CLIENT_LABEL}), its own pods and monitoring may")  # fmt: skip
                        continue
                    admitted[kind] |= numbers
                    allowed = scraped if kind == "monitoring" else serving
                    for number in sorted(numbers - allowed):
                        whose = "no PodMonitor scrapes it" if kind == "monitoring" else f"it is no port of {what}"
                        problems.append(f"{where}: {name} admits {kind} to port {number}, but {whose}")
        for port in service["spec"]["ports"]:
            if not w.port_numbers(port.get("targetPort", port["port"])) & (admitted["clients"] | admitted["own pods"]):
                problems.append(f"{where}: {what} port {port['port']} is not admitted by its NetworkPolicy")
        for number in sorted(scraped - admitted["monitoring"]):
            problems.append(f"{where}: a PodMonitor scrapes port {number} of {w.what}, but its NetworkPolicy does not "
                            "admit the monitoring namespace to it")  # fmt: skip
    return problems


# ------------------------------------------------------------------------------------------ user namespaces


def user_namespace_problems(docs: list[Doc], where: str) -> list[str]:
    """hostUsers: false on every workload pod but those HOST_USERS_EXEMPT names; in a user namespace, no host
    namespace and no UID or GID beyond what it maps."""
    problems = []
    for w in workloads(docs):
        in_user_namespace = w.pod.get("hostUsers", True) is False
        if not in_user_namespace and w.name not in HOST_USERS_EXEMPT:
            problems.append(f"{where}: {w.what}: hostUsers must be false (a user namespace: the pod's root and UIDs "
                            "are unprivileged on the node)")  # fmt: skip
        if not in_user_namespace:
            continue
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if w.pod.get(host):
                reason = f"; {HOST_USERS_EXEMPT[w.name]}" if w.name in HOST_USERS_EXEMPT else ""
                problems.append(f"{where}: {w.what}: the API refuses {host} beside hostUsers: false{reason}")
        contexts = [("pod", w.pod.get("securityContext", {}))] + [
            (f"container {c.name}", c.spec.get("securityContext", {})) for c in containers(w.pod).values()
        ]
        for whose, context in contexts:
            for field in ("runAsUser", "runAsGroup", "fsGroup"):
                value = context.get(field)
                if value is not None and not 0 <= int(value) < USER_NAMESPACE_IDS:
                    problems.append(f"{where}: {w.what}: {whose} {field} {value} is beyond 65535, the IDs a user "
                                    "namespace maps")  # fmt: skip
    return problems


# ------------------------------------------------------------------------------------------ the door


def door_problems(docs: list[Doc], where: str) -> list[str]:
    """A server bound beyond loopback has --api-key-file on a read-only Secret volume mounted whole (a subPath mount
    never sees a rotated Secret), the Secret not in the render (you create it), and no --allow-unauthenticated."""
    problems = []
    for s in serving_containers(docs):
        what = f"{where}: {s.what}"
        if is_loopback(s.flags.host):
            continue
        if getattr(s.flags, "allow_unauthenticated", False):
            problems.append(f"{what} runs --allow-unauthenticated: a pod's server keeps its door (--api-key-file)")
        key_file = getattr(s.flags, "api_key_file", None)
        if key_file is None:
            problems.append(f"{what} binds --host {s.flags.host} without --api-key-file: any pod that reaches it may "
                            "call it")  # fmt: skip
            continue
        mount = mount_at(s.container, key_file)
        secret = s.workload.volumes.get(mount["name"], {}).get("secret") if mount else None
        if mount is None or secret is None or mount.get("readOnly") is not True:
            problems.append(f"{what}: --api-key-file {key_file} must be on a read-only Secret volume")
        elif "subPath" in mount or "subPathExpr" in mount:
            problems.append(f"{what}: --api-key-file {key_file} is mounted with subPath: a rotated Secret never "
                            "reaches it; mount the Secret's directory")  # fmt: skip
        elif any(d["kind"] == "Secret" and d["metadata"]["name"] == secret["secretName"] for d in docs):
            problems.append(f"{what}: the API key Secret {secret['secretName']} must not be in the render: create it")
    return problems


# ------------------------------------------------------------------------------------------ the metrics port


def metrics_port_problems(docs: list[Doc], where: str) -> list[str]:
    """A PodMonitor scrapes a server on its --metrics-port (plain HTTP, no key: the serving port is the clients'
    door), which is a declared port bound beyond loopback (Prometheus reaches the pod IP)."""
    problems = []
    for s in serving_containers(docs):
        what = f"{where}: {s.what}"
        ours = {p["containerPort"] for p in s.container.spec.get("ports", [])}
        scraped = {n for n in pod_monitor_ports(docs, s.workload) if n in ours}
        if s.metrics_port is None:
            if scraped:
                problems.append(f"{what}: a PodMonitor scrapes it, but it has no --metrics-port (its serving "
                                "port's /metrics needs a key)")  # fmt: skip
            continue
        if s.metrics_port not in ours:
            problems.append(f"{what}: --metrics-port {s.metrics_port} is not a declared containerPort")
        if is_loopback(getattr(s.flags, "metrics_host", "127.0.0.1")):
            problems.append(f"{what}: --metrics-port {s.metrics_port} is bound to loopback (--metrics-host); "
                            "Prometheus reaches the pod IP")  # fmt: skip
        for number in sorted(scraped - {s.metrics_port}):
            problems.append(f"{what}: a PodMonitor scrapes port {number}, not its --metrics-port {s.metrics_port}")
        if not scraped:
            problems.append(f"{what}: no PodMonitor scrapes its --metrics-port {s.metrics_port}")
    return problems


# ------------------------------------------------------------------------------------------ TLS


def pod_certificate_problems(source: Doc) -> list[str]:
    """What the API server refuses in a podCertificate projection that the schema, types only, lets through."""
    problems = []
    signer = str(source.get("signerName", ""))
    if not _SIGNER.match(signer):
        problems.append(f"signerName {signer!r} must be DOMAIN/NAME (a signer a controller in the cluster serves)")
    if source.get("keyType") not in POD_CERTIFICATE_KEY_TYPES:
        problems.append(f"keyType {source.get('keyType')!r} is not one of {sorted(POD_CERTIFICATE_KEY_TYPES)}")
    lifetime = source.get("maxExpirationSeconds")
    low, high = POD_CERTIFICATE_LIFETIME_S
    if lifetime is not None and not low <= int(lifetime) <= high:
        problems.append(f"maxExpirationSeconds {lifetime} is outside {low}-{high} (1 hour to 91 days)")
    if ("keyPath" in source) != ("certificateChainPath" in source):
        problems.append("keyPath and certificateChainPath go together")
    if not any(k in source for k in ("credentialBundlePath", "keyPath")):
        problems.append("it writes nothing: give credentialBundlePath (or keyPath and certificateChainPath)")
    return problems


def _tls_file_source(s: Serving, path: str, flag: str, problems: list[str], what: str) -> tuple[str, Doc] | None:
    """The volume a TLS file is read from, as (volume name, the podCertificate source writing it, or {} for a
    Secret); None with a problem added if it is on none."""
    mount = mount_at(s.container, path)
    volume = s.workload.volumes.get(mount["name"], {}) if mount else {}
    if mount is None or mount.get("readOnly") is not True or not ({"projected", "secret"} & set(volume)):
        problems.append(f"{what}: {flag} {path} must be on a read-only Secret or projected podCertificate volume")
        return None
    if "subPath" in mount or "subPathExpr" in mount:
        problems.append(f"{what}: {flag} {path} is mounted with subPath: a rotated certificate never reaches it")
        return None
    relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    for source in volume.get("projected", {}).get("sources", []):
        cert = source.get("podCertificate")
        if cert is not None and relative in {cert.get(k) for k in ("credentialBundlePath", "keyPath",
                                                                    "certificateChainPath")}:  # fmt: skip
            return mount["name"], cert
    return mount["name"], {}


def tls_problems(docs: list[Doc], where: str) -> list[str]:
    """A TLS server's certificate and key come from one podCertificate source (or Secret) mounted whole; its probes
    speak HTTPS to the TLS port and plain HTTP elsewhere, and none reaches the TLS port under mutual TLS (the
    kubelet has no client certificate). Every podCertificate source passes `pod_certificate_problems`."""
    problems = []
    for w in workloads(docs):
        for volume in w.pod.get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                if "podCertificate" in source:
                    problems += [f"{where}: {w.what} volume {volume['name']}: podCertificate {p}"
                                 for p in pod_certificate_problems(source["podCertificate"])]  # fmt: skip
    for s in serving_containers(docs):
        what = f"{where}: {s.what}"
        cert, key = getattr(s.flags, "tls_cert", None), getattr(s.flags, "tls_key", None)
        tls = cert is not None and key is not None
        if tls:
            sources = [_tls_file_source(s, str(p), f, problems, what) for p, f in ((cert, "--tls-cert"),
                                                                                  (key, "--tls-key"))]  # fmt: skip
            if None not in sources and sources[0] != sources[1]:
                problems.append(f"{what}: --tls-cert and --tls-key must come from one volume source, so the kubelet "
                                "rotates them together")  # fmt: skip
        mutual = getattr(s.flags, "tls_client_ca", None) is not None
        for kind, get, port in s.probes():
            https = get.get("scheme", "HTTP") == "HTTPS"
            on_tls_port = tls and port == s.flags.port
            if on_tls_port and mutual:
                problems.append(f"{what} {kind} reaches the mutual-TLS port {port}: the kubelet has no client "
                                "certificate; probe the --metrics-port")  # fmt: skip
            elif on_tls_port and not https:
                problems.append(f"{what} {kind} speaks plain HTTP to the TLS port {port}: scheme must be HTTPS")
            elif not on_tls_port and https:
                problems.append(f"{what} {kind} speaks HTTPS to port {port}, which serves plain HTTP")
    return problems


def tenancy_problems(docs: list[Doc], where: str) -> list[str]:
    """Every rule above, for one rendered kustomization."""
    return (
        network_policy_problems(docs, where)
        + user_namespace_problems(docs, where)
        + door_problems(docs, where)
        + metrics_port_problems(docs, where)
        + tls_problems(docs, where)
    )
