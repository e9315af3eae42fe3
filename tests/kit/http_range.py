"""Static files over HTTP for the loader's http(s):// sources: Range requests answered 206, directories listed as
HTML, every request recorded; an aiohttp server in a thread on 127.0.0.1."""

from __future__ import annotations

import html
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.kit.threaded_http import RequestRecord, ThreadedAiohttpServer

# Where RangeHTTPServer keeps a request's record (typed keys exist from aiohttp 3.13 on).
_RECORD: Any = web.RequestKey("warmpod_record", RequestRecord) if hasattr(web, "RequestKey") else "warmpod_record"


class RangeHTTPServer(ThreadedAiohttpServer):
    """Serves the files under ``root``: Range requests get 206 (aiohttp ``FileResponse``), a directory
    gets an HTML index of absolute links, subdirectories with a trailing ``/`` so that fsspec's
    ``HTTPFileSystem`` (``ls``/``find``/``walk``) tells them from files.  Every request is recorded in
    ``requests`` (method, path, query, Range header, status) when it arrives.
    """

    def __init__(self, root: str | os.PathLike[str], *, list_dirs: bool = True) -> None:
        super().__init__("http-server")
        self.list_dirs = list_dirs  # False: directories answer 403, like nginx without `autoindex`
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(self.root)

    def url_for(self, relpath: str = "") -> str:
        """URL of ``relpath`` (relative to ``root``, posix separators)."""
        return f"{self.url}/{urllib.parse.quote(relpath.lstrip('/'))}"

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder])
        app.on_response_prepare.append(self._set_status)
        app.router.add_get("/{tail:.*}", self._handle)  # GET and HEAD
        return app

    @web.middleware
    async def _recorder(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[_RECORD] = self._record(request)  # on arrival, before routing
        return await handler(request)

    @staticmethod
    async def _set_status(request: web.Request, response: web.StreamResponse) -> None:
        # The final status is only known here: FileResponse picks 200/206/304/416 while preparing.
        if (record := request.get(_RECORD)) is not None:
            record.status = response.status

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = (self.root / request.match_info["tail"]).resolve()
        if not target.is_relative_to(self.root):
            raise web.HTTPForbidden()
        if target.is_dir():
            if not self.list_dirs:
                raise web.HTTPForbidden()
            return web.Response(text=self._index(target), content_type="text/html")
        if target.is_file():
            return web.FileResponse(target)
        raise web.HTTPNotFound()

    def _index(self, directory: Path) -> str:
        rel = directory.relative_to(self.root).as_posix()
        title = html.escape(f"Index of /{'' if rel == '.' else rel}")
        items = []
        for entry in sorted(directory.iterdir()):
            entry_rel = entry.relative_to(self.root).as_posix()
            suffix = "/" if entry.is_dir() else ""
            href = urllib.parse.quote(f"/{entry_rel}{suffix}")
            items.append(f'<li><a href="{html.escape(href)}">{html.escape(entry.name + suffix)}</a></li>')
        head = f"<html><head><title>{title}</title></head><body><h1>{title}</h1><ul>"
        return "\n".join([head, *items, "</ul></body></html>"])
