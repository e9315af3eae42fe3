"""warmpod.node, the node agent: one store per Kubernetes node shared by every replica pod on it.

`warmpod node` runs as a DaemonSet. It owns the node store (the store FORMAT of `warmpod.store`, many models, on a
tmpfs it controls), stages models from the catalog with the loader (preloaded, or on demand when a pod's volume
is published), keeps them current, evicts the least recently used under a byte budget (never a version a pod has
published or mapped), serves its published versions to peer agents, and is the CSI node plugin that hands a
model to a pod as a read-only ephemeral volume.
"""
