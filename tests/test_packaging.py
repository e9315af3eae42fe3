"""warmpod installs as one import package: the wheel built from a clean checkout, installed offline into a fresh
venv, adds only `warmpod/` and its dist-info to site-packages, and its commands work from a directory full of
modules that would shadow bare `loader`, `server`, `wasm` or `warmpod` imports."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.models import write_mlp
from tests.kit.procs import free_port, wait_until
from tests.kit.warmpod import REPO

pytestmark = pytest.mark.process

SHADOWS = ("server.py", "loader.py", "wasm.py", "warmpod.py")


def clean_checkout(dest: Path) -> Path:
    """The files git would check out (tracked, plus new ones it does not ignore), links kept as links."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = REPO / rel
        if not src.exists() and not src.is_symlink():  # deleted in the work tree, not yet committed
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, set[str], set[str]]]:
    """(venv python, site-packages entries before the install, after): the wheel built offline from a clean
    checkout, installed with no index into a fresh venv that sees the dependencies already on this machine."""
    root = tmp_path_factory.mktemp("packaging")
    src = clean_checkout(root / "src")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(root / "dist"), str(src)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("warmpod-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(root / "venv")],
                   check=True, timeout=120)  # fmt: skip
    python = root / "venv" / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    before = {p.name for p in site.iterdir()} if site.exists() else set()
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--no-compile", str(wheel)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    yield python, before, {p.name for p in site.iterdir()}


@pytest.fixture
def shadowed(tmp_path: Path) -> Path:
    """A working directory whose modules would win over bare top-level imports of those names."""
    work = tmp_path / "work"
    work.mkdir()
    for name in SHADOWS:
        (work / name).write_text(f"raise SystemExit('imported the user\\'s own {name}, not warmpod\\'s')\n")
    return work


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    bindir = python.parent
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([str(bindir / "warmpod"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def test_the_wheel_adds_only_the_warmpod_package(venv: tuple[Path, set[str], set[str]]) -> None:
    python, before, after = venv
    added = after - before
    assert "warmpod" in added
    assert {n for n in added if n != "warmpod" and not re.fullmatch(r"warmpod-[^/]+\.dist-info", n)} == set()
    dist_info = next(n for n in added if n.endswith(".dist-info"))
    site = python.parent.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    record = (site / dist_info / "RECORD").read_text()
    tops = {line.split("/", 1)[0].split(",", 1)[0] for line in record.splitlines() if line}
    assert {t for t in tops if not t.startswith("warmpod") and not t.startswith("..")} == set(), tops
    # real files, not links: the wheel carries the component folders' modules under warmpod/
    assert (site / "warmpod" / "loader" / "cli.py").is_file() and not (site / "warmpod" / "loader").is_symlink()
    assert (site / "warmpod" / "wasm" / "engine" / "warmpod_engine.wasm").is_file()
    where = subprocess.run([str(python), "-P", "-c", "import warmpod; print(warmpod.__file__)"], capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where) == site / "warmpod" / "__init__.py"  # the venv's copy, not this checkout's


@pytest.mark.parametrize("command", [("serve", "--help"), ("load", "--help"), ("edge", "serve", "--help")])
def test_commands_work_beside_modules_that_would_shadow_them(
    venv: tuple[Path, set[str], set[str]], shadowed: Path, command: tuple[str, ...]
) -> None:
    python = venv[0]
    proc = run(python, *command, cwd=shadowed)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: warmpod {' '.join(command[:-1])}" in proc.stdout
    # and `python -P -m warmpod`, as warmpod up starts its workers (-P: the working directory is not on sys.path)
    argv = [str(python), "-P", "-m", "warmpod", *command]
    module = subprocess.run(argv, cwd=shadowed, capture_output=True, text=True, timeout=120)
    assert module.returncode == 0, module.stderr


def test_one_version_from_the_package_metadata(venv: tuple[Path, set[str], set[str]], shadowed: Path) -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    proc = run(venv[0], "--version", cwd=shadowed)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"warmpod {version}")


def test_warmpod_up_serves_from_a_directory_that_shadows_its_modules(
    venv: tuple[Path, set[str], set[str]], shadowed: Path, tmp_path: Path
) -> None:
    python = venv[0]
    model = write_mlp(tmp_path / "iris")
    port = free_port()
    argv = [str(python.parent / "warmpod"), "up", str(model), "--model", "iris", "--store", str(tmp_path / "store"),
            "--port", str(port), "--max-replicas", "1"]  # fmt: skip
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(argv, cwd=shadowed, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:

        def served() -> bool:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            try:
                body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                               "data": [0.1, 0.2, 0.3, 0.4]}]}).encode()  # fmt: skip
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer", data=body,
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                with urllib.request.urlopen(request, timeout=5) as r:
                    return r.status == 200 and json.load(r)["model_name"] == "iris"
            except OSError:
                return False

        wait_until(served, timeout=120, interval=0.2, what="warmpod up to serve iris")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert "not warmpod's" not in text, text
    assert code == 0, text


def test_tests_and_benchmarks_import_the_installed_names() -> None:
    """Nothing imports the bare folder names: only `warmpod.loader`, `warmpod.server`, `warmpod.wasm`. The project's
    own files only: not the git-ignored benchmark venvs (bench/.venvs) or other hidden folders."""
    bare = re.compile(r"^\s*(from|import)\s+(loader|server|wasm)(\.|\s|$)", re.MULTILINE)
    offenders = [
        str(p.relative_to(REPO))
        for folder in ("tests", "bench", "loader", "server", "wasm", "warmpod")
        for p in (REPO / folder).rglob("*.py")
        if not p.is_symlink()
        and not any(part.startswith(".") for part in p.relative_to(REPO).parts)
        and bare.search(p.read_text())
    ]
    assert offenders == []
