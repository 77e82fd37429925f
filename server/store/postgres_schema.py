"""The PostgreSQL store's schema (created and migrated in order; `headswap_schema` records the version) and
the small helpers of talking to PostgreSQL.

Tables are prefixed `headswap_` so that the store can share a database. One row in `headswap_clock` hands
out change sequence numbers: taking it (row lock until commit) orders every pointer change by commit, so a
replica that reads the changes after the last one it applied never skips one that committed late.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: heads, pointers, examples, the embedding cache and the change log.
    """
    CREATE TABLE headswap_clock (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        seq bigint NOT NULL
    );
    INSERT INTO headswap_clock VALUES (true, 0);
    CREATE TABLE headswap_tenants (
        tenant text PRIMARY KEY,
        active_version bigint NOT NULL DEFAULT 0,
        previous_version bigint NOT NULL DEFAULT 0,
        next_version bigint NOT NULL DEFAULT 1,
        examples_id bigint,
        seq bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE headswap_versions (
        tenant text NOT NULL REFERENCES headswap_tenants ON DELETE CASCADE,
        version bigint NOT NULL,
        manifest jsonb NOT NULL,
        weights bytea NOT NULL,
        weights_sha256 text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant, version)
    );
    CREATE TABLE headswap_example_sets (
        id bigserial PRIMARY KEY,
        tenant text NOT NULL REFERENCES headswap_tenants ON DELETE CASCADE,
        examples jsonb NOT NULL
    );
    CREATE INDEX ON headswap_example_sets (tenant);
    CREATE TABLE headswap_embeddings (
        tenant text NOT NULL,
        fingerprint text NOT NULL,
        dim integer NOT NULL,
        keys bytea NOT NULL,
        vectors bytea NOT NULL,
        PRIMARY KEY (tenant, fingerprint)
    );
    CREATE TABLE headswap_changes (
        seq bigint PRIMARY KEY,
        tenant text NOT NULL,
        active_version bigint NOT NULL,
        weights_sha256 text NOT NULL DEFAULT '',
        deleted boolean NOT NULL DEFAULT false,
        at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: API keys (their HMACs only), and key changes in the change log so revocations reach every replica.
    """
    CREATE TABLE headswap_api_keys (
        id text PRIMARY KEY,
        role text NOT NULL CHECK (role IN ('tenant', 'admin')),
        tenant text,
        digest text NOT NULL,
        name text NOT NULL DEFAULT '',
        created_at double precision NOT NULL,
        expires_at double precision,
        revoked_at double precision
    );
    ALTER TABLE headswap_changes ADD COLUMN key_id text NOT NULL DEFAULT '';
    """,
    # 3: a checksum per cached embedding row, sha256(key + vector), bound to its key (NULL: written before it,
    # not trusted: embedded again).
    """
    ALTER TABLE headswap_embeddings ADD COLUMN checks bytea;
    """,
    # 4: AdaptHead idempotency keys, inserted in the transaction that stores what the call stored (a version,
    # or examples): the primary key makes a second commit of one request fail, on any replica.
    """
    CREATE TABLE headswap_requests (
        tenant text NOT NULL REFERENCES headswap_tenants ON DELETE CASCADE,
        request_id text NOT NULL,
        record jsonb NOT NULL,
        at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (tenant, request_id)
    );
    """,
)


def current_version(conn: Any) -> int:
    exists = conn.execute("SELECT to_regclass('headswap_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM headswap_schema").fetchone()
    return int(row[0] or 0)


def migrate(conn: Any) -> tuple[int, int]:
    """Apply the migrations not applied yet, each in its own transaction; returns (before, after).
    An advisory lock keeps two replicas starting at once from migrating twice."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('headswap_schema'))")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS headswap_schema (version integer PRIMARY KEY, at timestamptz DEFAULT now())"
        )
        before = current_version(conn)
        for number, sql in enumerate(MIGRATIONS[before:], start=before + 1):
            conn.execute(sql)
            conn.execute("INSERT INTO headswap_schema (version) VALUES (%s)", (number,))
            log.info("store schema migrated to version %d", number)
    return before, len(MIGRATIONS)


def redact(url: str) -> str:
    """The connection string without its password, for logs and messages."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(url)
    except Exception:
        return "postgresql://(unparsable connection string)"
    parts.pop("password", None)
    return make_conninfo("", **{k: v for k, v in parts.items() if v is not None})


def first_line(exc: BaseException) -> str:
    """An error's first line (psycopg's carry hints and context below it), or its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value)


def one(conn: Any, query: str) -> Any:
    row = conn.execute(query).fetchone()
    return row[0] if row else None
