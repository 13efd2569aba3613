"""A job kind for the claim tests on PostgreSQL: each run records itself in a table of the test's database, so
the test counts executions independently of the job store (imported by dotted path in the job's child)."""

from __future__ import annotations

import os

import psycopg

from services.core.jobs.context import JobContext

KINDS = {"records": "tests.support.claim_jobkinds:records"}

EXECUTIONS_DDL = "CREATE TABLE claim_executions (job TEXT NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL)"


def records(ctx: JobContext) -> dict:
    """Insert (job, attempt, pid) into ``claim_executions`` of the database ``spec.dsn``; outputs the pid."""
    with psycopg.connect(ctx.spec["dsn"], autocommit=True) as conn:
        conn.execute("INSERT INTO claim_executions (job, attempt, pid) VALUES (%s, %s, %s)",
                     (ctx.name, ctx.attempt, os.getpid()))
    return {"pid": os.getpid()}
