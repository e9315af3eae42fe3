"""The tenancy of the rendered tree (issue 15): who may connect to which port, which pods run in a user namespace, the
API-key Secret wherever a server binds beyond loopback, the metrics port Prometheus scrapes, and the TLS overlay's
podCertificate volume. What the renders hold is asserted first; then each rule of tests.deploy.tenancy is shown to
catch the mistake it exists for, on a copy of a render with that one mistake made (the other renders' rules run in
test_manifests.py through pod_problems)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import pytest

from tests.deploy.manifests import RENDERABLE, Doc, containers, find, pod_problems, render
from tests.deploy.tenancy import (
    CLIENT_LABEL,
    HOST_USERS_EXEMPT,
    pod_certificate_problems,
    serving_containers,
    tenancy_problems,
    workloads,
)

KEY_SECRET = "warmpod-api-keys"  # the Secret you create (docs/kubernetes.md, "Tenancy in the cluster")
TLS_BUNDLE = "/var/run/secrets/warmpod.dev/tls/credentials.pem"  # the TLS overlay's --tls-cert and --tls-key


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: render(path) for name, path in RENDERABLE.items()}


# ------------------------------------------------------------------------------------------ what the renders hold


def test_every_workload_pod_runs_in_a_user_namespace_but_the_node_agent(rendered: dict[str, list[Doc]]) -> None:
    """hostUsers: false on the server in the base and every overlay and on the edge; the node agent alone keeps the
    host's, and what makes it exempt (hostPID, a privileged container mounting Bidirectional) is still there."""
    host_users = {(name, w.what): w.pod.get("hostUsers", True) for name in rendered for w in workloads(rendered[name])}
    kept = {what for (_, what), value in host_users.items() if value is not False}
    assert kept == {"DaemonSet/warmpod-node"}, host_users
    assert set(HOST_USERS_EXEMPT) == {"warmpod-node"}
    agent = find(rendered["node"], "DaemonSet")["spec"]["template"]["spec"]
    assert agent["hostPID"] is True
    assert containers(agent)["agent"].spec["securityContext"]["privileged"] is True
    servers = {name for (name, what), value in host_users.items() if what == "Deployment/warmpod" and value is False}
    assert servers == set(RENDERABLE) - {"edge", "node"}


def test_every_server_reads_its_keys_from_the_secret_you_create(rendered: dict[str, list[Doc]]) -> None:
    """Each `warmpod serve` and `warmpod edge serve` binds 0.0.0.0 with --api-key-file, the file `keys` of the
    Secret warmpod-api-keys mounted whole and read-only, and the Secret is in no render."""
    seen = set()
    for name, docs in rendered.items():
        for s in serving_containers(docs):
            assert s.flags.host == "0.0.0.0" and not s.flags.allow_unauthenticated, name
            mount = next(m for m in s.container.spec["volumeMounts"] if m["name"] == "api-keys")
            assert mount["readOnly"] is True and "subPath" not in mount, name
            assert PurePosixPath(s.flags.api_key_file) == PurePosixPath(mount["mountPath"]) / "keys", name
            assert s.workload.volumes["api-keys"]["secret"]["secretName"] == KEY_SECRET, name
            assert not [d for d in docs if d["kind"] == "Secret"], name
            seen.add((name, s.command))
    assert {command for _, command in seen} == {"serve", "edge serve"}
    assert {name for name, _ in seen} == set(RENDERABLE) - {"node"}


def _rules(docs: list[Doc], policy: str) -> list[tuple[Any, list[Any]]]:
    """(the rule's peers, its ports by name) of each ingress rule of a NetworkPolicy."""
    spec = find(docs, "NetworkPolicy", policy)["spec"]
    return [(rule["from"], [p["port"] for p in rule["ports"]]) for rule in spec["ingress"]]


def test_clients_reach_the_serving_port_and_monitoring_the_metrics_ports(rendered: dict[str, list[Doc]]) -> None:
    """Labelled clients, from any namespace, to the serving port; the monitoring namespace to the server's and the
    loader's metrics ports (the node-cache pod has no loader); the node agents to each other, as before."""
    clients = [{"namespaceSelector": {}, "podSelector": {"matchLabels": CLIENT_LABEL}}]
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert _rules(rendered["base"], "warmpod") == [(clients, ["http"]), (monitoring, ["metrics", "loader-http"])]
    assert _rules(rendered["node-cache"], "warmpod") == [(clients, ["http"]), (monitoring, ["metrics"])]
    assert _rules(rendered["tls"], "warmpod") == _rules(rendered["base"], "warmpod")
    assert _rules(rendered["edge"], "warmpod-edge") == [(clients, ["http"]), (monitoring, ["metrics"])]
    agents = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "warmpod-node",
                                              "app.kubernetes.io/component": "agent"}}}]  # fmt: skip
    assert _rules(rendered["node"], "warmpod-node") == [(agents, ["http"]), (monitoring, ["http"])]
    for name, docs in rendered.items():
        services = [d for d in docs if d["kind"] == "Service"]
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        assert len(policies) == len(services) == 1, name


def test_prometheus_scrapes_the_servers_on_their_metrics_port(rendered: dict[str, list[Doc]]) -> None:
    """--metrics-host 0.0.0.0 --metrics-port 9090, declared as the port `metrics`, which the PodMonitor scrapes;
    the Service exposes the serving port only."""
    for name in ("base", "edge", "tls", "node-cache"):
        (s,) = serving_containers(rendered[name])
        assert (s.flags.metrics_host, s.flags.metrics_port) == ("0.0.0.0", 9090), name
        ports = {p["name"]: p["containerPort"] for p in s.container.spec["ports"]}
        assert ports["metrics"] == 9090, name
        endpoints = find(rendered[name], "PodMonitor")["spec"]["podMetricsEndpoints"]
        assert endpoints[0]["port"] == "metrics" and "scheme" not in endpoints[0], name
        assert [p["name"] for p in find(rendered[name], "Service")["spec"]["ports"]] == ["http"], name


def test_the_tls_overlay_is_the_base_with_a_pod_certificate(rendered: dict[str, list[Doc]]) -> None:
    """The TLS overlay changes the server's container by its TLS flags (one credential bundle for both), the mount
    of the podCertificate volume and HTTPS probes, nothing else; the Service says https, Prometheus stays on the
    plain metrics port."""
    base = containers(find(rendered["base"], "Deployment")["spec"]["template"]["spec"])["server"].spec
    pod = find(rendered["tls"], "Deployment")["spec"]["template"]["spec"]
    server = containers(pod)["server"].spec
    (tls_mount,) = [m for m in server["volumeMounts"] if m not in base["volumeMounts"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tls_mount["name"]]
    (source,) = volume["projected"]["sources"]
    bundle = f"{tls_mount['mountPath']}/{source['podCertificate']['credentialBundlePath']}"
    assert server["args"] == [*base["args"], "--tls-cert", bundle, "--tls-key", bundle]
    assert tls_mount["readOnly"] is True and "subPath" not in tls_mount
    assert volume["projected"]["defaultMode"] == 0o440  # the private key: the server's group only
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server[probe]["httpGet"] == {**base[probe]["httpGet"], "scheme": "HTTPS"}, probe
    changed = {"args", "volumeMounts", "startupProbe", "livenessProbe", "readinessProbe"}
    assert {k: v for k, v in server.items() if k not in changed} == {k: v for k, v in base.items() if k not in changed}
    assert pod_certificate_problems(source["podCertificate"]) == []
    assert find(rendered["tls"], "Service")["spec"]["ports"][0]["appProtocol"] == "https"
    assert find(rendered["tls"], "PodMonitor") == find(rendered["base"], "PodMonitor")


def test_mutual_tls_with_the_probes_on_the_metrics_port_keeps_the_invariants(rendered: dict[str, list[Doc]]) -> None:
    """What docs/kubernetes.md tells a user adding --tls-client-ca: probe the plain metrics port, which serves the
    same health routes; and keyPath + certificateChainPath from one source are as good as the bundle."""
    docs = copy.deepcopy(rendered["tls"])
    server = _server(docs)
    server["args"] += ["--tls-client-ca", "/etc/warmpod/client-ca/ca.pem"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        server[probe]["httpGet"] = {**server[probe]["httpGet"], "port": "metrics", "scheme": "HTTP"}
    assert pod_problems(docs, "tls+mtls") == []
    source = _pod_certificate(docs)
    del source["credentialBundlePath"]
    source.update(keyPath="tls.key", certificateChainPath="tls.crt")
    _set_arg(server, "--tls-cert", "/var/run/secrets/warmpod.dev/tls/tls.crt")
    _set_arg(server, "--tls-key", "/var/run/secrets/warmpod.dev/tls/tls.key")
    assert pod_problems(docs, "tls+mtls, two files") == []


# ------------------------------------------------------------------- each rule catches its mistake


def _workload(docs: list[Doc]) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in docs if d["kind"] in ("Deployment", "DaemonSet"))
    return found


def _pod(docs: list[Doc]) -> dict[str, Any]:
    pod: dict[str, Any] = _workload(docs)["spec"]["template"]["spec"]
    return pod


def _server(docs: list[Doc]) -> dict[str, Any]:
    """The serving container: the server's, or the edge's."""
    return next(c.spec for c in containers(_pod(docs)).values() if c.name in ("server", "edge"))


def _mount(container: dict[str, Any], volume: str) -> dict[str, Any]:
    return next(m for m in container["volumeMounts"] if m["name"] == volume)


def _volume(docs: list[Doc], name: str) -> dict[str, Any]:
    return next(v for v in _pod(docs)["volumes"] if v["name"] == name)


def _set_arg(container: dict[str, Any], flag: str, value: str) -> None:
    args = container["args"]
    args[args.index(flag) + 1] = value


def _drop_arg(container: dict[str, Any], flag: str) -> None:
    args = container["args"]
    del args[args.index(flag) : args.index(flag) + 2]


def _drop_args(container: dict[str, Any], *flags: str) -> None:
    for flag in flags:
        _drop_arg(container, flag)


def _rule(docs: list[Doc], index: int) -> dict[str, Any]:
    rule: dict[str, Any] = find(docs, "NetworkPolicy")["spec"]["ingress"][index]
    return rule


def _key_secret() -> Doc:
    """The Secret you create, committed by mistake."""
    metadata = {"name": KEY_SECRET, "namespace": "warmpod"}
    return {"apiVersion": "v1", "kind": "Secret", "stringData": {"keys": "team-a:secret"}, "metadata": metadata}


def _pod_certificate(docs: list[Doc]) -> dict[str, Any]:
    source: dict[str, Any] = _volume(docs, "tls")["projected"]["sources"][0]["podCertificate"]
    return source


MISTAKES: dict[str, tuple[str, Callable[[list[Doc]], None], str]] = {
    # user namespaces
    "pod in the host's user namespace": (
        "base",
        lambda d: _pod(d).pop("hostUsers"),
        "Deployment/warmpod: hostUsers must be false",
    ),
    "edge in the host's user namespace": (
        "edge",
        lambda d: _pod(d).update(hostUsers=True),
        "DaemonSet/warmpod-edge: hostUsers must be false",
    ),
    "UID beyond what a user namespace maps": (
        "base",
        lambda d: _pod(d)["securityContext"].update(runAsUser=70000),
        "pod runAsUser 70000 is beyond 65535",
    ),
    "host network in a user namespace": (
        "node-cache",
        lambda d: _pod(d).update(hostNetwork=True),
        "the API refuses hostNetwork beside hostUsers: false",
    ),
    "node agent put in a user namespace": (
        "node",
        lambda d: _pod(d).update(hostUsers=False),
        "the API refuses hostPID beside hostUsers: false; the node agent needs hostPID",
    ),
    # the door
    "server without keys": (
        "base",
        lambda d: _drop_arg(_server(d), "--api-key-file"),
        "container server binds --host 0.0.0.0 without --api-key-file",
    ),
    "edge without keys": (
        "edge",
        lambda d: _drop_arg(_server(d), "--api-key-file"),
        "container edge binds --host 0.0.0.0 without --api-key-file",
    ),
    "door left open": (
        "base",
        lambda d: _server(d)["args"].append("--allow-unauthenticated"),
        "container server runs --allow-unauthenticated",
    ),
    "keys through subPath": (
        "base",
        lambda d: _mount(_server(d), "api-keys").update(subPath="keys", mountPath="/etc/warmpod/api-keys/keys"),
        "--api-key-file /etc/warmpod/api-keys/keys is mounted with subPath",
    ),
    "keys on a writable mount": (
        "base",
        lambda d: _mount(_server(d), "api-keys").pop("readOnly"),
        "--api-key-file /etc/warmpod/api-keys/keys must be on a read-only Secret volume",
    ),
    "keys from a ConfigMap": (
        "edge",
        lambda d: _volume(d, "api-keys").update(secret=None, configMap={"name": "keys"}),
        "--api-key-file /etc/warmpod/api-keys/keys must be on a read-only Secret volume",
    ),
    "keys committed": (
        "base",
        lambda d: d.append(_key_secret()),
        f"the API key Secret {KEY_SECRET} must not be in the render",
    ),
    # network policies
    "no NetworkPolicy": (
        "base",
        lambda d: d.remove(find(d, "NetworkPolicy")),
        "Service/warmpod: no NetworkPolicy selects its pods",
    ),
    "edge without a NetworkPolicy": (
        "edge",
        lambda d: d.remove(find(d, "NetworkPolicy")),
        "Service/warmpod-edge: no NetworkPolicy selects its pods",
    ),
    "policy for other pods": (
        "tls",
        lambda d: find(d, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "loader"}
        ),
        "Service/warmpod: no NetworkPolicy selects its pods",
    ),
    "any pod is a client": (
        "base",
        lambda d: _rule(d, 0)["from"][0].update(podSelector={}),
        "admits {'namespaceSelector': {}, 'podSelector': {}}: only clients",
    ),
    "an address block": (
        "edge",
        lambda d: _rule(d, 0)["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
        "admits {'ipBlock': {'cidr': '0.0.0.0/0'}}: only clients",
    ),
    "clients reach the metrics port": (
        "base",
        lambda d: _rule(d, 0)["ports"].append({"port": "metrics", "protocol": "TCP"}),
        "NetworkPolicy/warmpod admits clients to port 9090, but it is no port of Service/warmpod",
    ),
    "clients reach the loader": (
        "base",
        lambda d: _rule(d, 0)["ports"].append({"port": 8090, "protocol": "TCP"}),
        "NetworkPolicy/warmpod admits clients to port 8090, but it is no port of Service/warmpod",
    ),
    "monitoring reaches the serving port": (
        "edge",
        lambda d: _rule(d, 1)["ports"].append({"port": "http", "protocol": "TCP"}),
        "NetworkPolicy/warmpod-edge admits monitoring to port 8081, but no PodMonitor scrapes it",
    ),
    "serving port closed": (
        "base",
        lambda d: _rule(d, 0).update(ports=[{"port": "loader-http", "protocol": "TCP"}]),
        "Service/warmpod port 8080 is not admitted by its NetworkPolicy",
    ),
    "Prometheus shut out": (
        "base",
        lambda d: _rule(d, 1)["ports"].pop(0),
        "a PodMonitor scrapes port 9090 of Deployment/warmpod, but its NetworkPolicy does not admit the monitoring",
    ),
    "policy names a port nobody declares": (
        "node-cache",
        lambda d: _rule(d, 1)["ports"].append({"port": "loader-http", "protocol": "TCP"}),
        "NetworkPolicy/warmpod admits port loader-http, which no container declares",
    ),
    # the metrics port
    "metrics scraped on the serving port": (
        "base",
        lambda d: find(d, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(port="http"),
        "container server: a PodMonitor scrapes port 8080, not its --metrics-port 9090",
    ),
    "metrics port on loopback": (
        "edge",
        lambda d: _set_arg(_server(d), "--metrics-host", "127.0.0.1"),
        "container edge: --metrics-port 9090 is bound to loopback",
    ),
    "metrics port not declared": (
        "base",
        lambda d: _set_arg(_server(d), "--metrics-port", "9091"),
        "container server: --metrics-port 9091 is not a declared containerPort",
    ),
    "metrics without a metrics port": (
        "node-cache",
        lambda d: _drop_args(_server(d), "--metrics-port", "--metrics-host"),
        "container server: a PodMonitor scrapes it, but it has no --metrics-port",
    ),
    # TLS
    "HTTPS probe on a plain server": (
        "base",
        lambda d: _server(d)["readinessProbe"]["httpGet"].update(scheme="HTTPS"),
        "container server readinessProbe speaks HTTPS to port 8080, which serves plain HTTP",
    ),
    "plain probe on the TLS port": (
        "tls",
        lambda d: _server(d)["livenessProbe"]["httpGet"].pop("scheme"),
        "container server livenessProbe speaks plain HTTP to the TLS port 8080",
    ),
    "HTTPS probe on the plain metrics port": (
        "tls",
        lambda d: _server(d)["startupProbe"]["httpGet"].update(port="metrics"),
        "container server startupProbe speaks HTTPS to port 9090, which serves plain HTTP",
    ),
    "probes on the mutual-TLS port": (
        "tls",
        lambda d: _server(d)["args"].extend(["--tls-client-ca", "/etc/warmpod/client-ca/ca.pem"]),
        "container server readinessProbe reaches the mutual-TLS port 8080",
    ),
    "certificate through subPath": (
        "tls",
        lambda d: _mount(_server(d), "tls").update(subPath="credentials.pem", mountPath=TLS_BUNDLE),
        f"--tls-cert {TLS_BUNDLE} is mounted with subPath",
    ),
    "certificate on a writable mount": (
        "tls",
        lambda d: _mount(_server(d), "tls").update(readOnly=False),
        "must be on a read-only Secret or projected podCertificate volume",
    ),
    "key from another volume": (
        "tls",
        lambda d: _set_arg(_server(d), "--tls-key", "/etc/warmpod/api-keys/tls.key"),
        "--tls-cert and --tls-key must come from one volume source",
    ),
    "signer without a domain": (
        "tls",
        lambda d: _pod_certificate(d).update(signerName="warmpod-serving"),
        "podCertificate signerName 'warmpod-serving' must be DOMAIN/NAME",
    ),
    "key type the kubelet does not make": (
        "tls",
        lambda d: _pod_certificate(d).update(keyType="RSA2048"),
        "podCertificate keyType 'RSA2048' is not one of",
    ),
    "certificate for ten minutes": (
        "tls",
        lambda d: _pod_certificate(d).update(maxExpirationSeconds=600),
        "podCertificate maxExpirationSeconds 600 is outside 3600-7862400",
    ),
    "key without its chain": (
        "tls",
        lambda d: _pod_certificate(d).update(keyPath="tls.key"),
        "podCertificate keyPath and certificateChainPath go together",
    ),
    "projection that writes nothing": (
        "tls",
        lambda d: _pod_certificate(d).pop("credentialBundlePath"),
        "podCertificate it writes nothing",
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_tenancy_rule_catches_its_mistake(rendered: dict[str, list[Doc]], mistake: str) -> None:
    name, make, message = MISTAKES[mistake]
    docs = copy.deepcopy(rendered[name])
    assert tenancy_problems(docs, name) == []
    make(docs)
    problems = tenancy_problems(docs, name)
    assert any(message in p for p in problems), problems
