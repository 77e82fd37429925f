"""Where heads, versions, active pointers, labelled examples and cached embeddings live."""

from headswap.server.store.base import Change, HeadStore, NewVersion, StoredVersion, TenantState

__all__ = ["Change", "HeadStore", "NewVersion", "StoredVersion", "TenantState", "open_store"]


def open_store(url: str, max_versions: int = 50) -> HeadStore:
    """The store a `--store` setting names: a directory path (the local store)."""
    from pathlib import Path

    from headswap.server.store.local import LocalStore

    return LocalStore(Path(url).expanduser(), max_versions=max_versions)
