"""Where heads, versions, active pointers, labelled examples and cached embeddings live."""

from headswap.server.store.base import (
    Change,
    HeadStore,
    NewVersion,
    StoredVersion,
    TenantState,
)
from headswap.server.store.requests import AlreadyDone, RequestRecord

__all__ = [
    "AlreadyDone",
    "Change",
    "HeadStore",
    "NewVersion",
    "RequestRecord",
    "StoredVersion",
    "TenantState",
    "is_postgres",
    "open_store",
]


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str, max_versions: int = 50, migrate: bool = False, shared: bool = False) -> HeadStore:
    """The store a `--store` setting names: a postgresql:// URL (shared by replicas) or a directory.
    `shared`: a directory that several processes of one server (its workers) use at once."""
    if is_postgres(url):
        from headswap.server.store.postgres import open_postgres

        return open_postgres(url, max_versions, migrate)
    from pathlib import Path

    from headswap.server.store.local import LocalStore

    return LocalStore(Path(url).expanduser(), max_versions=max_versions, shared=shared)
