"""Migrations: versioned files applied once each, in order, recorded with their checksum;
then the repeatable definitions of ``sql/`` re-applied. One transaction under an advisory
lock, so several processes may run it at once."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .db import configure, connect, describe, sql_dir
from .errors import MigrationError

log = logging.getLogger(__name__)

LOCK_KEY = 0x6175746F656D62  # "autoemb"

LEDGER = """
CREATE SCHEMA IF NOT EXISTS autoembed;
CREATE TABLE IF NOT EXISTS autoembed.schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass
class MigrateReport:
    applied: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    repeatable: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    not_refreshed: list[str] = field(default_factory=list)


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def migration_files(root: Path | None = None) -> list[Path]:
    folder = root / "migrations" if root else sql_dir("migrations")
    return sorted(folder.glob("*.sql"))


def repeatable_files(root: Path | None = None) -> list[Path]:
    return sorted((root / "sql" if root else sql_dir("sql")).glob("*.sql"))


async def _run_file(conn: psycopg.AsyncConnection[Any], path: Path) -> None:
    text = path.read_text()  # noqa: ASYNC240 - a few kB, once per migrate
    try:
        await conn.execute(text.encode())  # a whole file, no parameters
    except psycopg.Error as exc:
        where = ""
        position = exc.diag.statement_position if exc.diag else None
        if position and position.isdigit():
            where = f" (line {text[: int(position)].count(chr(10)) + 1})"
        context = exc.diag.context if exc.diag and exc.diag.context else ""
        raise MigrationError(
            f"migration failed in {path.name}{where}, nothing was changed: {describe(exc)}"
            + (f"\ncontext: {context.strip()}" if context else "")
        ) from exc


async def migrate_connection(
    conn: psycopg.AsyncConnection[Any], root: Path | None = None
) -> MigrateReport:
    report = MigrateReport()
    files = migration_files(root)
    if not files:
        raise MigrationError(
            f"no migrations found under {root / 'migrations' if root else sql_dir('migrations')}"
        )
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            await conn.execute(LEDGER)
            cur = await conn.execute("SELECT version, checksum FROM autoembed.schema_migrations")
            applied = {version: digest for version, digest in await cur.fetchall()}
            known = {f.stem for f in files}
            unknown = sorted(set(applied) - known)
            if unknown:
                raise MigrationError(
                    "the database has migrations this autoembed does not know "
                    f"({', '.join(unknown)}): a newer version migrated it; upgrade autoembed"
                )
            for path in files:
                digest = checksum(path)
                if path.stem in applied:
                    if applied[path.stem] != digest:
                        raise MigrationError(
                            f"migration {path.name} was applied with checksum "
                            f"{applied[path.stem][:12]}… but the file now has {digest[:12]}…: "
                            "an applied migration must never change; put the change in a new "
                            "migration file"
                        )
                    report.already.append(path.stem)
                    continue
                log.info("applying migration %s", path.name)
                await _run_file(conn, path)
                await conn.execute(
                    "INSERT INTO autoembed.schema_migrations (version, checksum) VALUES (%s, %s)",
                    (path.stem, digest),
                )
                report.applied.append(path.stem)
            for path in repeatable_files(root):
                await _run_file(conn, path)
                report.repeatable.append(path.stem)
            await _refresh_watches(conn, report)
    except MigrationError:
        raise
    except psycopg.Error as exc:
        raise MigrationError(f"migration failed, nothing was changed: {describe(exc)}") from exc
    await configure(conn)
    return report


async def _refresh_watches(conn: psycopg.AsyncConnection[Any], report: MigrateReport) -> None:
    """Re-make every watch's accessors and search functions from the definitions just
    applied, so that an upgrade's fixes reach the watches made before it. A watch that
    cannot be served (its table changed) is left as it is and named; one that fails is
    named with its error and the others go on."""
    cur = await conn.execute("SELECT id, source::text FROM autoembed.watches ORDER BY id")
    for watch_id, source in await cur.fetchall():
        try:
            async with conn.transaction():
                cur = await conn.execute("SELECT autoembed.refresh(%s)", (watch_id,))
                row = await cur.fetchone()
        except psycopg.Error as exc:
            log.warning("watch %s (%s) was not refreshed: %s", watch_id, source, describe(exc))
            report.not_refreshed.append(f"{source}: {describe(exc)}")
            continue
        if row is not None and row[0] is not None:
            report.not_refreshed.append(f"{source}: {row[0]}")
        else:
            report.refreshed.append(source)


async def migrate(url: str, root: Path | None = None) -> MigrateReport:
    conn = await connect(url, vector=False)
    try:
        return await migrate_connection(conn, root)
    finally:
        await conn.close()
