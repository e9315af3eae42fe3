"""Moved to tests.kit (s3, http_range, fault_proxy, procs). Kept only so that files still importing this name keep
working while their owners move them to tests.kit; nothing new imports it, and it goes once nothing does."""

from tests.kit.fault_proxy import FaultConfig, FaultProxy, ProxyStats
from tests.kit.http_range import RangeHTTPServer
from tests.kit.procs import LOOPBACK, ServerStartError, free_port, free_ports, wait_until
from tests.kit.s3 import MotoServer, S3Bucket, S3Server, SeaweedServer, find_weed, s3_env

__all__ = ["LOOPBACK", "FaultConfig", "FaultProxy", "MotoServer", "ProxyStats", "RangeHTTPServer", "S3Bucket",
           "S3Server", "SeaweedServer", "ServerStartError", "find_weed", "free_port", "free_ports", "s3_env",
           "wait_until"]  # fmt: skip
