"""The store's own errors (what the callers catch besides the engines' :data:`portal.store.engine.Error`)."""

from __future__ import annotations


class StoreError(RuntimeError):
    pass


class StoreConflict(StoreError):
    """A write that breaks a uniqueness rule (a user name taken, ...)."""
