"""The OpenAPI 3 document of warmpod's HTTP API: `openapi.json` beside this module (shipped in the wheel), served at
GET /openapi.json with `info.version` set to the running warmpod's version."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def document(version: str) -> dict[str, Any]:
    """The document, for warmpod `version`."""
    doc: dict[str, Any] = json.loads(resources.files("warmpod.server").joinpath("openapi.json").read_text("utf-8"))
    doc["info"]["version"] = version
    return doc
