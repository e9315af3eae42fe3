"""Moved to tests.kit (warmpod, clients, metrics, procs). Kept only so that files still importing this name keep
working while their owners move them to tests.kit; nothing new imports it, and it goes once nothing does."""

from tests.kit.clients import LoadThread, http, post_json
from tests.kit.metrics import MetricsPage, Scrape
from tests.kit.procs import ChildProcess as LoggedProcess
from tests.kit.warmpod import ServerProcess, WarmpodServer, stage

__all__ = ["LoadThread", "LoggedProcess", "MetricsPage", "Scrape", "ServerProcess", "WarmpodServer", "http",
           "post_json", "stage"]  # fmt: skip
