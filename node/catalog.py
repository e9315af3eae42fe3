"""The catalog: which models a node agent may stage, from where, and which namespaces may mount each.

It is the cluster admin's (a ConfigMap mounted as a file), so a pod can never make the agent fetch an arbitrary
URI with the agent's credentials: a volume names a model, the catalog says where it comes from.

    {"models": {"NAME": {"source": "s3://bucket/prefix/",         the loader's SOURCE
                         "namespaces": ["team-a", "team-b"],     who may mount it ("*": every namespace)
                         "sha256": {"model.safetensors": "…"},   optional pinned digests (the loader's --sha256)
                         "dtype": null}}}                        reserved: the staged dtype (null: as the source)

Pure: text in, a Catalog out, or a UsageError naming the entry and the rule broken.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmpod.errors import UsageError
from warmpod.node.errors import NamespaceDenied, NotInCatalog
from warmpod.store import check_model_name

ALL_NAMESPACES = "*"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    namespaces: frozenset[str]
    sha256: Mapping[str, str] = field(default_factory=dict)
    dtype: str | None = None

    def allows(self, namespace: str | None) -> bool:
        return ALL_NAMESPACES in self.namespaces or (namespace is not None and namespace in self.namespaces)


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, CatalogEntry]

    def entry(self, name: str, namespace: str | None) -> CatalogEntry:
        """The model a pod in `namespace` asks for; NotInCatalog, NamespaceDenied."""
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotInCatalog(f"model {name!r} is not in this node's catalog (it lists: {known}); ask the cluster "
                               "admin to add it to the warmpod catalog ConfigMap")  # fmt: skip
        if not entry.allows(namespace):
            raise NamespaceDenied(
                f"namespace {namespace!r} may not mount model {name!r} (the catalog allows: "
                f"{', '.join(sorted(entry.namespaces)) or 'no namespace'})"
            )
        return entry


def parse_catalog(text: str, where: str = "catalog") -> Catalog:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise UsageError(f'{where}: must be a JSON object with a "models" object')
    return Catalog({name: _entry(name, spec, where) for name, spec in doc["models"].items()})


def read_catalog(path: Path) -> Catalog:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--catalog {path}: cannot read: {e.strerror}") from None
    return parse_catalog(text, f"--catalog {path}")


def _entry(name: str, spec: Any, where: str) -> CatalogEntry:
    what = f"{where}: model {name!r}"
    try:
        check_model_name(name)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{what}: must be an object with a source")
    unknown = sorted(set(spec) - {"source", "namespaces", "sha256", "dtype"})
    if unknown:
        raise UsageError(f"{what}: unknown fields {unknown}")
    source = spec.get("source")
    if not isinstance(source, str) or not source:
        raise UsageError(f'{what}: "source" must be the loader\'s SOURCE (a path or URL)')
    namespaces = spec.get("namespaces", [])
    if not isinstance(namespaces, list) or not all(isinstance(n, str) and n for n in namespaces):
        raise UsageError(f'{what}: "namespaces" must be a list of namespace names ("*" for all)')
    sha256 = spec.get("sha256", {})
    if not isinstance(sha256, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sha256.items()):
        raise UsageError(f'{what}: "sha256" must map file paths to hex digests')
    dtype = spec.get("dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise UsageError(f'{what}: "dtype" must be a string or null')
    return CatalogEntry(name, source, frozenset(namespaces), dict(sha256), dtype)
