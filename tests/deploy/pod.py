"""The rendered warmpod pod run as local processes: each container's command, environment and mounts derived from
the Kustomize render and its image's Dockerfile by the kubelet's rules, then launched in a mount namespace whose root
filesystem is read-only and whose volumes are bound with their volumeMount's `readOnly`.

Pure part (no processes): `expand` ($(VAR) as the kubelet expands it), `resolve_env` (env, envFrom, ConfigMaps,
Secrets), `command_line` (command/args over the image's ENTRYPOINT/CMD), `container_process` (all of it for one
container), and the small rewrites a test applies (`replace_arg`, `replace_flag_value`, `relocate`).

Process part: `PodProcess` runs a `ContainerProcess` (a tests.kit ChildProcess) through this module's launcher,
`python -m tests.deploy.pod launch SPEC_JSON`, which enters its own mount namespace (unshare(2)), remounts every
mount except /proc, /sys, /dev and theirs read-only, binds each volume directory onto itself with its volumeMount's
read-only flag, then execs the container's command. `isolation_problem()` says why that cannot work here (not root,
unshare or mount refused); a pod then runs as plain processes.

Not reproduced: the pod's user (runAsUser: the processes run as the test's user), dropped capabilities, seccomp,
resource limits and the emptyDirs' sizeLimit, and the probes' schedules (a test polls the probe paths itself).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.deploy.dockerfile import Stage, final_stage
from tests.kit.procs import ChildProcess, signal_group

REPO = Path(__file__).parents[2]
IMAGES = REPO / "images"

Doc = dict[str, Any]


class PodSpecError(ValueError):
    """The manifest asks for something the kubelet would refuse (CreateContainerConfigError) or this runner lacks."""


# ------------------------------------------------------------------------------------------ the kubelet's rules


def expand(text: str, env: Mapping[str, str]) -> str:
    """`$(VAR)` references replaced as the kubelet does for command, args and env values
    (k8s.io/kubernetes/third_party/forked/golang/expansion): `$$` is an escaped `$` (so `$$(VAR)` stays literally
    `$(VAR)`), an undefined `$(VAR)` stays as written, and a `$` not starting `$(...)` or `$$` is kept."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "$" or i + 1 == n:
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:  # an incomplete reference is kept as written
                out.append("$(")
                i += 2
                continue
            name = text[i + 2 : close]
            out.append(env.get(name, f"$({name})"))
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def _config_key(
    kind: str, ref: Mapping[str, Any], sources: Mapping[str, Mapping[str, str]], container: str
) -> str | None:
    name, key, optional = ref["name"], ref["key"], bool(ref.get("optional", False))
    data = sources.get(name)
    if data is None or key not in data:
        if optional:
            return None
        missing = f"{kind} {name!r}" if data is None else f"key {key!r} in {kind} {name!r}"
        raise PodSpecError(f"container {container}: {missing} not found")
    return data[key]


def resolve_env(
    container: Mapping[str, Any],
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    """The environment the kubelet gives `container` (before the image's ENV is laid under it).

    envFrom first, in order (a later source wins a duplicate key; `prefix` prepended), then env in order, each
    entry overriding: a `value` has its $(VAR) references expanded against what is defined so far, a
    `configMapKeyRef`/`secretKeyRef` is read as is. A missing source or key fails, unless marked optional.
    Secrets are given decoded (name -> {key: value}). Service-link variables are not added (the pod sets
    enableServiceLinks: false), nor are fieldRef/resourceFieldRef supported.
    """
    name = str(container["name"])
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, sources in (("configMapRef", config_maps), ("secretRef", secrets)):
            ref = source.get(kind)
            if ref is None:
                continue
            data = sources.get(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodSpecError(f"container {name}: {kind} {ref['name']!r} not found")
            env.update({prefix + key: value for key, value in data.items()})
    for var in container.get("env", []):
        value_from = var.get("valueFrom")
        if value_from is None:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        if "configMapKeyRef" in value_from:
            value = _config_key("ConfigMap", value_from["configMapKeyRef"], config_maps, name)
        elif "secretKeyRef" in value_from:
            value = _config_key("Secret", value_from["secretKeyRef"], secrets, name)
        else:
            raise PodSpecError(f"container {name}: env {var['name']}: only configMapKeyRef/secretKeyRef supported")
        if value is not None:
            env[var["name"]] = value
    return env


def command_line(container: Mapping[str, Any], image: Stage, env: Mapping[str, str]) -> list[str]:
    """The process's argv: `command` replaces the image's ENTRYPOINT (and drops its CMD), `args` replaces CMD;
    $(VAR) expanded against the container's env (the kubelet's, which knows nothing of the image's ENV)."""
    command = container.get("command")
    args = container.get("args")
    if command is not None:
        argv = [*command, *(args or [])]
    else:
        argv = [*image.entrypoint, *(args if args is not None else image.cmd)]
    if not argv:
        raise PodSpecError(f"container {container['name']}: no command (neither the manifest nor the image has one)")
    return [expand(str(a), env) for a in argv]


@dataclass(frozen=True)
class VolumeMount:
    volume: str
    path: str  # where the process sees it (the mountPath; a host directory once relocated)
    read_only: bool


@dataclass(frozen=True)
class ContainerProcess:
    """What a container runs: argv, the complete environment, its volume mounts and working directory."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    mounts: tuple[VolumeMount, ...]
    workdir: str
    read_only_root: bool

    def replace(self, **changes: Any) -> ContainerProcess:
        return dataclasses.replace(self, **changes)


def dockerfile_for(image: str, images: Path = IMAGES) -> Path:
    """images/NAME/Dockerfile for an image reference `registry/org/NAME:tag` (or `NAME@digest`)."""
    name = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    path = images / name / "Dockerfile"
    if not path.is_file():
        raise PodSpecError(f"image {image}: no Dockerfile at {path}")
    return path


def container_process(
    container: Mapping[str, Any],
    image: Stage,
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, str]],
    *,
    path: str,
) -> ContainerProcess:
    """One container as a process: the image's ENV overlaid by the manifest's (the runtime's merge), except PATH,
    which is `path` (this machine's, where the image's /opt/warmpod/bin does not exist)."""
    kube_env = resolve_env(container, config_maps, secrets)
    env = {k: v for k, v in image.env.items() if k != "PATH"} | kube_env | {"PATH": path}
    mounts = tuple(
        VolumeMount(m["name"], m["mountPath"], bool(m.get("readOnly", False)))
        for m in container.get("volumeMounts", [])
    )
    security = container.get("securityContext", {})
    return ContainerProcess(
        name=str(container["name"]),
        argv=tuple(command_line(container, image, kube_env)),
        env=env,
        mounts=mounts,
        workdir=str(container.get("workingDir", image.workdir)),
        read_only_root=bool(security.get("readOnlyRootFilesystem", False)),
    )


def pod_containers(pod: Doc) -> dict[str, Doc]:
    """A pod spec's initContainers and containers by name, in the order the kubelet starts them."""
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def config_maps(docs: Iterable[Doc]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: dict(d.get("data", {})) for d in docs if d["kind"] == "ConfigMap"}


def image_stage(container: Mapping[str, Any]) -> Stage:
    """The final stage of the Dockerfile that builds the container's image."""
    return final_stage(dockerfile_for(str(container["image"])))


def container_port(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's `port`: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise PodSpecError(f"container {container['name']}: no port named {port!r}")


# ------------------------------------------------------------------------------------- a test's rewrites


def replace_arg(argv: Sequence[str], old: str, new: str) -> tuple[str, ...]:
    """argv with its one argument equal to `old` replaced (more or fewer than one is an error: say which)."""
    hits = [i for i, a in enumerate(argv) if a == old]
    if len(hits) != 1:
        raise PodSpecError(f"expected exactly one argument {old!r} in {list(argv)}, found {len(hits)}")
    return tuple(new if i == hits[0] else a for i, a in enumerate(argv))


def replace_flag_value(argv: Sequence[str], flag: str, new: str) -> tuple[str, ...]:
    """argv with the value of `flag` (`--flag VALUE` or `--flag=VALUE`) replaced; the flag must be there once."""
    out = list(argv)
    hits = [i for i, a in enumerate(out) if a == flag or a.startswith(flag + "=")]
    if len(hits) != 1:
        raise PodSpecError(f"expected flag {flag} once in {out}, found {len(hits)}")
    i = hits[0]
    if out[i] == flag:
        if i + 1 >= len(out):
            raise PodSpecError(f"flag {flag} has no value in {out}")
        out[i + 1] = new
    else:
        out[i] = f"{flag}={new}"
    return tuple(out)


def flag_value(argv: Sequence[str], flag: str) -> str:
    """The value of `flag` (`--flag VALUE` or `--flag=VALUE`) in argv."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.partition("=")[2]
    raise PodSpecError(f"no flag {flag} in {list(argv)}")


def _moved(value: str, moves: Mapping[str, str]) -> str:
    for old, new in sorted(moves.items(), key=lambda move: -len(move[0])):  # the deepest mountPath first
        if value == old:
            return new
        if value.startswith(old.rstrip("/") + "/"):
            return new + value[len(old.rstrip("/")) :]
    return value


def relocate(process: ContainerProcess, directories: Mapping[str, Path]) -> ContainerProcess:
    """Each volume's mountPath replaced by the host directory given for that volume, wherever the process is told
    a path: in argv and env values equal to the mountPath or under it, and in the mounts themselves."""
    moves = {m.path: str(directories[m.volume]) for m in process.mounts}
    return process.replace(
        argv=tuple(_moved(a, moves) for a in process.argv),
        env={k: _moved(v, moves) for k, v in process.env.items()},
        mounts=tuple(dataclasses.replace(m, path=moves[m.path]) for m in process.mounts),
    )


# ------------------------------------------------------------------------------------ the launcher (in-process)

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
# Per-mount flags a read-only remount keeps as they were (a bind remount resets those it is not given).
_KEPT = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
# Left writable, as in a container: the kernel's own filesystems and /dev (its /dev/shm included).
KERNEL_MOUNTS = ("/proc", "/sys", "/dev")
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo's escapes of space, tab, newline and backslash


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    options: frozenset[str]  # per-mount options: rw/ro, nosuid, nodev, noexec, relatime...


def parse_mountinfo(text: str) -> list[MountEntry]:
    """/proc/self/mountinfo: each mount's point (octal escapes decoded) and per-mount options, in mount order."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        entries.append(MountEntry(point, frozenset(fields[5].split(","))))
    return entries


def to_make_read_only(entries: Iterable[MountEntry]) -> list[MountEntry]:
    """The writable mounts a read-only root filesystem covers: all but the kernel's, each mount point once."""
    seen: dict[str, MountEntry] = {}
    for e in entries:
        kernel = any(e.mount_point == k or e.mount_point.startswith(k + "/") for k in KERNEL_MOUNTS)
        if not kernel and "ro" not in e.options:
            seen[e.mount_point] = e  # the last one mounted at a point is the one its path reaches
    return list(seen.values())


def _kept_flags(options: Iterable[str]) -> int:
    flags = 0
    for option in options:
        flags |= _KEPT.get(option, 0)
    return flags


class _Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare_mounts(self) -> None:
        self._check(self.lib.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # Nothing mounted here may propagate back to the host's namespace.
        self._check(self.lib.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")

    def bind(self, path: str) -> None:
        self._check(self.lib.mount(path.encode(), path.encode(), None, MS_BIND, None), f"bind {path}")

    def remount(self, path: str, *, read_only: bool, keep: int) -> None:
        flags = MS_REMOUNT | MS_BIND | keep | (MS_RDONLY if read_only else 0)
        self._check(self.lib.mount(None, path.encode(), None, flags, None), f"remount {path}")


def _mount_entry(path: str) -> MountEntry:
    return [e for e in parse_mountinfo(Path("/proc/self/mountinfo").read_text()) if e.mount_point == path][-1]


def isolate(mounts: Sequence[Mapping[str, Any]], *, read_only_root: bool) -> None:
    """In this process: a private mount namespace, every non-kernel mount read-only (with `read_only_root`), then
    each volume directory bound onto itself, read-only or writable as its volumeMount says."""
    libc = _Libc()
    libc.unshare_mounts()
    if read_only_root:
        for entry in to_make_read_only(parse_mountinfo(Path("/proc/self/mountinfo").read_text())):
            try:
                libc.remount(entry.mount_point, read_only=True, keep=_kept_flags(entry.options))
            except OSError as e:
                if e.errno != errno.ENOENT:  # a mount point gone meanwhile covers nothing
                    raise
    for mount in mounts:
        path = str(mount["path"])
        libc.bind(path)
        libc.remount(path, read_only=bool(mount["read_only"]), keep=_kept_flags(_mount_entry(path).options))


def launch(spec: Mapping[str, Any]) -> None:
    """Become the container: isolate (if asked), enter its working directory, exec its command (env inherited)."""
    if spec["isolate"]:
        isolate(spec["mounts"], read_only_root=spec["read_only_root"])
    os.chdir(spec["workdir"])
    argv = list(spec["argv"])
    os.execvp(argv[0], argv)


def probe(volume: str) -> int:
    """Check the isolation on this machine: after `isolate`, the volume takes a write and the rest refuses one."""
    isolate([{"path": volume, "read_only": False}], read_only_root=True)
    Path(volume, "written").write_text("ok")
    outside = Path(volume).parent / "outside"
    try:
        outside.write_text("must fail")
    except OSError as e:
        if e.errno == errno.EROFS:
            return 0
        raise
    print(f"wrote {outside} although the root filesystem was remounted read-only", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "launch":
        launch(json.loads(argv[1]))
        return 127  # not reached: exec replaced this process
    if len(argv) == 2 and argv[0] == "probe":
        return probe(argv[1])
    print("usage: python -m tests.deploy.pod launch SPEC_JSON | probe DIR", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ the process part


def isolation_problem(timeout: float = 30) -> str | None:
    """Why containers cannot get a mount namespace with a read-only root here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"mount namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "not root: unshare(CLONE_NEWNS) and mount need CAP_SYS_ADMIN"
    with tempfile.TemporaryDirectory(prefix="warmpod-isolation-") as tmp:
        volume = Path(tmp, "volume")
        volume.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "tests.deploy.pod", "probe", str(volume)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            return f"the isolation probe failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        if not Path(volume, "written").exists():
            return "the isolation probe's write to its volume did not reach the host directory"
        if Path(tmp, "outside").exists():
            return "the isolation probe wrote outside its volume"
    return None


class PodProcess(ChildProcess):
    """One container of the pod as a running process (a tests.kit ChildProcess): its own process group, logs to
    `log_path`, killed by the kernel if the test process dies. `start` again after it exited is the kubelet's restart;
    the log keeps every run."""

    def __init__(self, spec: ContainerProcess, log_path: Path, *, isolate: bool) -> None:
        launch_spec = {
            "argv": list(spec.argv),
            "workdir": spec.workdir,
            "mounts": [{"path": m.path, "read_only": m.read_only} for m in spec.mounts],
            "read_only_root": spec.read_only_root,
            "isolate": isolate,
        }
        super().__init__([sys.executable, "-m", "tests.deploy.pod", "launch", json.dumps(launch_spec)],
                         name=spec.name, log_path=log_path, env=dict(spec.env),
                         cwd=REPO,  # for `-m tests.deploy.pod`; the launcher then enters the container's workdir
                         own_group=True)  # fmt: skip
        self.spec, self.isolate = spec, isolate
        self.starts = 0

    def start(self, timeout: float = 0) -> Self:
        """Spawn the container's process (no readiness here: the test probes it as the kubelet would)."""
        if self.running:
            raise RuntimeError(f"{self.spec.name} is already running")
        assert self.log_path is not None
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"----- {self.spec.name}: start {self.starts}: {' '.join(self.spec.argv)}\n".encode())
        return self.spawn()

    def kill_group(self) -> None:
        """SIGKILL to every process of the container (its process group), as a runtime kills a container."""
        if self.proc is not None:
            signal_group(self.proc, signal.SIGKILL)

    def stop(self) -> int | None:
        """Teardown: kill whatever is left, never raising."""
        self.kill_group()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.wait(10)
        return None

    def mount_namespace(self) -> str:
        return os.readlink(f"/proc/{self.pid}/ns/mnt")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
