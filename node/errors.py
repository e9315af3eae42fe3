"""The node agent's errors, each with the gRPC status a CSI call answers it with (the kubelet reads the code)."""

from __future__ import annotations

from warmpod.errors import WarmpodError


class NodeError(WarmpodError):
    """A model cannot be handed to a pod; the message says why and what to change."""

    grpc_status = "INTERNAL"  # a grpc.StatusCode name
    exit_code = 1


class InvalidVolume(NodeError):
    """The kubelet's call is malformed: missing volume attributes, a target path outside the pods directory."""

    grpc_status = "INVALID_ARGUMENT"
    exit_code = 2


class NotInCatalog(NodeError):
    """The volume names a model the cluster admin's catalog does not list."""

    grpc_status = "NOT_FOUND"
    exit_code = 3


class SourceMissing(NodeError):
    """The catalog's source for the model cannot be found (or read)."""

    grpc_status = "NOT_FOUND"
    exit_code = 3


class NamespaceDenied(NodeError):
    """The pod's namespace may not mount this model (the catalog's `namespaces`)."""

    grpc_status = "PERMISSION_DENIED"
    exit_code = 4


class OverBudget(NodeError):
    """The model does not fit the node budget (--max-bytes) even after evicting everything not in use."""

    grpc_status = "RESOURCE_EXHAUSTED"
    exit_code = 7


class StagingTimeout(NodeError):
    """The model was not staged within the publish timeout; the kubelet retries NodePublishVolume."""

    grpc_status = "DEADLINE_EXCEEDED"
    exit_code = 8
