"""Who is asking: the tenant a request belongs to, as the serving app passes it from the door to the batcher.

The door (API keys, `warmpod.server.auth`; or a verified TLS client certificate, `warmpod.server.tls`) puts the
tenant's name on the request under `TENANT`; everything after it (fair queuing, quotas, per-tenant metrics, the
audit log) reads it with `tenant_of`. Without a door every request is `ANONYMOUS`. A tenant is a name an operator
chose (the key file's `TENANT:` part, a certificate's subject common name): never a key, safe for logs and labels.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

TENANT = "warmpod.tenant"  # request key: the tenant's name, set by the door
ANONYMOUS = "anonymous"  # the tenant of every request when no door is configured


def tenant_of(request: web.Request) -> str:
    tenant: str = request.get(TENANT, ANONYMOUS)
    return tenant


def certificate_tenant(peercert: dict[str, Any] | None) -> str | None:
    """The tenant named by a verified client certificate (`ssl.SSLSocket.getpeercert()`'s dict): its subject's
    commonName, else the whole subject as `key=value,...`; None without a certificate."""
    if not peercert:
        return None
    pairs = [pair for rdn in peercert.get("subject", ()) for pair in rdn]
    for key, value in pairs:
        if key == "commonName" and value:
            return str(value)
    return ",".join(f"{k}={v}" for k, v in pairs) or None
