"""The support kit's servers and child processes work: ranges, listings, fault injection, counters, S3 clients, env
helper; a child's ready line, its log, its stop, its process group."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import fsspec
import pytest

from tests.kit.fault_proxy import FaultProxy
from tests.kit.http_range import RangeHTTPServer
from tests.kit.procs import ChildProcess, ProcessExited, ServerStartError, wait_until
from tests.kit.s3 import MotoServer, S3Bucket, SeaweedServer

DATA = bytes(range(256)) * 64  # 16 KiB, every offset distinguishable mod 256
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never env proxies


def _get(url: str, range_: str | None = None) -> tuple[int, Message, bytes]:
    """GET ``url`` (optionally ranged): status, case-insensitive headers, body."""
    request = urllib.request.Request(url, headers={"Range": range_} if range_ else {})
    try:
        with _OPENER.open(request, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(DATA)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "shard 1.bin").write_bytes(DATA[:100])
    return root


@pytest.fixture
def served(tree: Path, http_server: Callable[[Path], RangeHTTPServer]) -> RangeHTTPServer:
    return http_server(tree)


# --------------------------------------------------------------------------------------------------
# HTTP server


def test_http_server_answers_range_with_206_and_lists_directories(served: RangeHTTPServer) -> None:
    status, headers, body = _get(served.url_for("model.safetensors"), "bytes=10-19")
    assert status == 206
    assert body == DATA[10:20]
    assert headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"

    status, _, body = _get(served.url_for("model.safetensors"))
    assert (status, body) == (200, DATA)

    status, headers, index = _get(served.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'href="/model.safetensors"' in index and b'href="/sub/"' in index

    assert _get(served.url_for("missing"))[0] == 404
    assert served.requests.count("GET") == 4
    assert served.requests.count("GET", ranged=True) == 1
    assert served.requests.records()[0].range == "bytes=10-19"
    assert [r.status for r in served.requests.records()] == [206, 200, 200, 404]


def test_fsspec_http_finds_files_and_reads_ranges(served: RangeHTTPServer) -> None:
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    found = fs.find(served.url + "/")
    assert sorted(found) == sorted(
        [
            served.url_for("config.json"),
            served.url_for("model.safetensors"),
            served.url_for("sub/shard 1.bin"),
        ]
    )
    assert fs.cat_file(served.url_for("model.safetensors"), start=1000, end=1100) == DATA[1000:1100]
    assert fs.size(served.url_for("model.safetensors")) == len(DATA)


# --------------------------------------------------------------------------------------------------
# Fault proxy


def test_proxy_is_transparent_and_counts(served: RangeHTTPServer, fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(served.url)
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    assert len(fs.find(proxy.url + "/")) == 3  # absolute links in the index resolve against the proxy
    status, headers, body = _get(proxy.url + "/model.safetensors", "bytes=5-9")
    assert (status, body) == (206, DATA[5:10])
    assert headers["Content-Range"] == f"bytes 5-9/{len(DATA)}" and headers["Content-Length"] == "5"
    assert "ETag" in headers

    stats = proxy.stats()
    assert stats.ranged_gets == 1 and stats.faults_injected == 0
    assert stats.total == stats.gets == proxy.requests.count() == served.requests.count()
    assert proxy.requests.records()[-1].body_bytes == 5  # the body it sent back, counted as it went
    proxy.reset_stats()
    assert proxy.stats().total == 0 and len(proxy.requests) == 0


def test_proxy_fails_the_configured_fraction_of_ranged_gets(
    served: RangeHTTPServer, fault_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy(served.url, fail_fraction=0.3, seed=7)
    url = proxy.url + "/model.safetensors"
    statuses = [_get(url, f"bytes={i}-{i}")[0] for i in range(200)]
    failed = statuses.count(503)
    assert statuses.count(206) + failed == 200
    assert 40 <= failed <= 80  # seeded, so deterministic; about 30%
    assert proxy.stats().failed == failed == proxy.stats().faults_injected
    assert served.requests.count() == 200 - failed  # a failed request never reaches upstream

    assert _get(url)[0] == 200  # not ranged: not eligible (ranged_only=True)
    # The same seed gives the same sequence.
    proxy.configure(seed=7)
    assert [_get(url, f"bytes={i}-{i}")[0] for i in range(200)] == statuses


def test_proxy_fail_every_and_fail_next(served: RangeHTTPServer, fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(served.url, fail_every=3)
    url = proxy.url + "/model.safetensors"
    assert [_get(url, "bytes=0-0")[0] for _ in range(6)] == [206, 206, 503, 206, 206, 503]
    proxy.configure(fail_every=0, fail_next=2, fail_status=500)
    assert [_get(url, "bytes=0-0")[0] for _ in range(3)] == [500, 500, 206]
    proxy.clear_faults()
    assert _get(url, "bytes=0-0")[0] == 206


def test_proxy_reset_gives_client_errors(served: RangeHTTPServer, fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(served.url, reset_next=1, reset_after_bytes=1000)
    request = urllib.request.Request(proxy.url + "/model.safetensors", headers={"Range": "bytes=0-9999"})
    with _OPENER.open(request, timeout=10) as resp:
        assert resp.status == 206
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
    assert info.value.partial == DATA[:1000]
    assert proxy.requests.records()[-1].body_bytes == 1000  # what crossed before the drop

    proxy.configure(reset_next=1, reset_mode="rst")
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead, urllib.error.URLError)):
        _get(proxy.url + "/model.safetensors", "bytes=0-9999")
    assert proxy.stats().resets == 2
    assert _get(proxy.url + "/model.safetensors", "bytes=0-9999")[2] == DATA[:10000]


# --------------------------------------------------------------------------------------------------
# moto


def test_moto_range_read_through_proxy(moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy) -> None:
    client = moto_s3.client(endpoint=moto_proxy.endpoint)
    client.put_object(Bucket=moto_bucket.name, Key="dir/model.safetensors", Body=DATA)
    resp = client.get_object(Bucket=moto_bucket.name, Key="dir/model.safetensors", Range="bytes=100-199")
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert resp["Body"].read() == DATA[100:200]
    assert resp["ContentRange"] == f"bytes 100-199/{len(DATA)}"
    assert resp["ETag"] == client.head_object(Bucket=moto_bucket.name, Key="dir/model.safetensors")["ETag"]

    stats = moto_proxy.stats()
    assert (stats.gets, stats.ranged_gets, stats.heads, stats.other) == (1, 1, 1, 1)
    prefix = f"/{moto_bucket.name}/dir/"
    assert moto_proxy.requests.count("GET", path_prefix=prefix) == 1


def test_moto_access_log_counts_gets(moto_s3: MotoServer, moto_bucket: S3Bucket) -> None:
    moto_bucket.put("a.bin", DATA)
    before = moto_s3.count_logged("GET", path_prefix=f"/{moto_bucket.name}/")
    moto_s3.client().get_object(Bucket=moto_bucket.name, Key="a.bin", Range="bytes=0-9")["Body"].read()
    wait_until(  # moto writes its log line just after answering
        lambda: moto_s3.count_logged("GET", path_prefix=f"/{moto_bucket.name}/") == before + 1,
        timeout=5,
        what="moto access log",
    )


def test_forced_statuses_map_to_s3_errors(moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy) -> None:
    moto_bucket.put("private/w.bin", DATA)
    moto_bucket.put("gone/w.bin", DATA)
    moto_proxy.configure(status_for_prefix={f"/{moto_bucket.name}/private/": 403, f"{moto_bucket.name}/gone": 404})
    client = moto_s3.client(endpoint=moto_proxy.endpoint, max_attempts=1)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.get_object(Bucket=moto_bucket.name, Key="private/w.bin")
    assert info.value.response["Error"]["Code"] == "AccessDenied"

    fs = moto_s3.s3fs(endpoint=moto_proxy.endpoint)
    with pytest.raises(PermissionError):
        fs.cat_file(moto_bucket.uri("private/w.bin"), start=0, end=10)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(moto_bucket.uri("gone/w.bin"), start=0, end=10)
    assert moto_proxy.stats().forced >= 3
    moto_proxy.clear_faults()
    assert fs.cat_file(moto_bucket.uri("private/w.bin"), start=0, end=10) == DATA[:10]


def test_s3_reset_is_a_client_error(moto_s3: MotoServer, moto_bucket: S3Bucket, moto_proxy: FaultProxy) -> None:
    moto_bucket.put("w.bin", DATA)
    moto_proxy.configure(reset_next=1)
    client = moto_s3.client(endpoint=moto_proxy.endpoint, max_attempts=1)
    resp = client.get_object(Bucket=moto_bucket.name, Key="w.bin", Range="bytes=0-4095")
    with pytest.raises(botocore.exceptions.ResponseStreamingError):
        resp["Body"].read()
    assert client.get_object(Bucket=moto_bucket.name, Key="w.bin", Range="bytes=0-4095")["Body"].read() == DATA[:4096]


def test_s3fs_reads_a_range_from_moto(moto_s3: MotoServer, moto_bucket: S3Bucket, tree: Path) -> None:
    keys = moto_bucket.upload_dir(tree, prefix="m/")
    assert sorted(keys) == ["m/config.json", "m/model.safetensors", "m/sub/shard 1.bin"]
    fs = moto_s3.s3fs()
    assert fs.cat_file(moto_bucket.uri("m/model.safetensors"), start=300, end=310) == DATA[300:310]
    assert len(fs.find(moto_bucket.uri("m/"))) == 3


def test_s3_env_drives_a_client_subprocess(moto_s3: MotoServer, moto_bucket: S3Bucket) -> None:
    moto_bucket.put("k.bin", DATA)
    script = textwrap.dedent(
        f"""
        import boto3, sys
        s3 = boto3.client("s3")  # endpoint, region and keys all come from the environment
        body = s3.get_object(Bucket="{moto_bucket.name}", Key="k.bin", Range="bytes=1-3")["Body"]
        sys.stdout.write(body.read().hex())
        """
    )
    env = moto_s3.subprocess_env()
    assert env["AWS_ENDPOINT_URL"] == moto_s3.endpoint and env["AWS_ACCESS_KEY_ID"] == "testing"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout) == DATA[1:4]


def test_moto_env_fixture_sets_process_env(moto_env: dict[str, str], moto_s3: MotoServer) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == moto_s3.endpoint == moto_env["AWS_ENDPOINT_URL_S3"]
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"


def test_stopped_servers_release_their_ports(tree: Path) -> None:
    with RangeHTTPServer(tree) as server, FaultProxy(server.url) as proxy:
        urls = [server.url_for("config.json"), proxy.url + "/config.json"]
        assert all(_get(url)[0] == 200 for url in urls)
    for url in urls:
        with pytest.raises(urllib.error.URLError):
            _OPENER.open(url, timeout=2)


def test_wait_until_fails_clearly() -> None:
    with pytest.raises(ServerStartError, match="thing was not ready within 0s"):
        wait_until(lambda: False, timeout=0.1, what="thing", diagnostics=lambda: "details")


# --------------------------------------------------------------------------------------------------
# Child processes


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_child_is_started_at_its_ready_line_and_stopped_with_sigterm(tmp_path: Path) -> None:
    child = ChildProcess(
        _python("""
            import sys, time
            print("warming up", flush=True)
            print("listening on port 1234", file=sys.stderr, flush=True)
            time.sleep(60)
        """),
        name="sleeper",
        log_path=tmp_path / "sleeper.log",
        ready=re.compile(r"listening on port (\d+)"),
    )
    with child:
        assert child.match is not None and child.match.group(1) == "1234"
        (first, warming), (second, listening) = child.lines
        assert (warming, listening) == ("warming up", "listening on port 1234")  # stdout and stderr, in order
        assert child.started <= first <= second <= time.monotonic()
    assert child.returncode == -signal.SIGTERM
    assert (tmp_path / "sleeper.log").read_text() == "warming up\nlistening on port 1234\n" == child.log()


def test_a_child_that_exits_before_it_is_ready_fails_with_its_log() -> None:
    child = ChildProcess(_python("print('no such model'); raise SystemExit(3)"), name="doomed",
                         ready=re.compile("ready"))  # fmt: skip
    with pytest.raises(ProcessExited, match=r"doomed exited 3:\n(.|\n)*no such model"):
        child.start(timeout=30)


def test_what_a_child_wrote_before_it_answered_is_in_its_log_once_the_answer_is(tmp_path: Path) -> None:
    answer = tmp_path / "answer"
    code = f"""
        import pathlib, time
        for i in range(200):
            print(f"line {{i}}", flush=True)
            pathlib.Path({str(answer)!r}).write_text(str(i))
            time.sleep(0.001)
    """
    with ChildProcess(_python(code), name="writer") as child:
        for _ in range(50):
            wait_until(answer.exists, timeout=10, what="an answer", interval=0.001)
            last = int(answer.read_text() or 0)
            assert f"line {last}\n" in child.log()  # no wait: looking at the log takes what the pipe holds
        assert child.wait(30) == 0
    assert child.log().count("\n") == 200


def test_a_child_in_its_own_group_is_stopped_with_everything_it_started(tmp_path: Path) -> None:
    code = """
        import subprocess, sys, time
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"helper {helper.pid}", flush=True)
        time.sleep(60)
    """
    with ChildProcess(_python(code), name="server", ready=re.compile(r"helper (\d+)"), own_group=True) as child:
        assert child.match is not None
        helper = int(child.match.group(1))
        os.kill(helper, 0)  # running
    wait_until(lambda: not Path(f"/proc/{helper}").exists() or _zombie(helper), timeout=10, what="the helper gone")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------------------------------
# SeaweedFS


@pytest.mark.seaweed
def test_s3fs_reads_a_range_from_seaweed(seaweed_s3: SeaweedServer, seaweed_bucket: S3Bucket) -> None:
    seaweed_bucket.put("dir/model.safetensors", DATA)
    fs = seaweed_s3.s3fs()
    assert fs.cat_file(seaweed_bucket.uri("dir/model.safetensors"), start=500, end=520) == DATA[500:520]


@pytest.mark.seaweed
def test_seaweed_checks_signatures_and_works_through_the_proxy(
    seaweed_s3: SeaweedServer, seaweed_bucket: S3Bucket, fault_proxy: Callable[..., FaultProxy]
) -> None:
    seaweed_bucket.put("w.bin", DATA)
    proxy = fault_proxy(seaweed_s3.endpoint)
    # SigV4 signs the Host header: the client signs for the proxy, which forwards Host unchanged.
    client = seaweed_s3.client(endpoint=proxy.endpoint)
    resp = client.get_object(Bucket=seaweed_bucket.name, Key="w.bin", Range="bytes=8-15")
    assert (resp["ResponseMetadata"]["HTTPStatusCode"], resp["Body"].read()) == (206, DATA[8:16])
    assert proxy.stats().ranged_gets == 1

    wrong = boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        aws_access_key_id=seaweed_s3.access_key,
        aws_secret_access_key="not-the-secret",
        region_name=seaweed_s3.region,
        config=botocore.config.Config(retries={"max_attempts": 1}, proxies={}),
    )
    with pytest.raises(botocore.exceptions.ClientError) as info:
        wrong.get_object(Bucket=seaweed_bucket.name, Key="w.bin")
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
