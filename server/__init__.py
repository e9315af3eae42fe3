"""warmpod server: the HTTP inference endpoint over the shared-memory store (see issue 3)."""
