"""Settlement queries find a payment's settling line through the index, whatever the table holds.

Found by review: the queries said ``category <> 'duplicate_in_settlement'``, the partial index on
settlement_lines(payment_id) says ``category IN (the four settling categories)``, and the planner cannot prove
the one from the other, so each lookup scanned every line ever stored: an import's time grew with history
(25 s for 1,000 exception lines beside 200,000 stored lines). A timing test would be flaky; the plan is not.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time

import asyncpg
import pytest

from ledger.sql import load_blocks

BLOCKS = load_blocks("paysvc.queries")
SAMPLE = {"text": "x", "int4": 1, "int8": 1, "int2": 1, "date": date(2026, 11, 26), "time": time(23, 59),
          "timestamptz": datetime(2026, 11, 26, tzinfo=UTC), "bool": True, "bytea": b"x", "_text": ["x"],
          "_int8": [1], "jsonb": "{}", "numeric": 1, "xid8": 1}
LOOKUPS = sorted(name for name, sql in BLOCKS.items()
                 if "settlement_lines" in sql and "payment_id" in sql and "settlement_lines (" not in sql)


def _seq_scans(node: dict, found: list[str]) -> list[str]:
    if node.get("Node Type") == "Seq Scan":
        found.append(node.get("Relation Name", "?"))
    for child in node.get("Plans", []):
        _seq_scans(child, found)
    return found


def test_the_lookups_are_found():
    assert {"categorize", "exceptions_from_staging", "raise_missing_in_settlement", "settling_line_of_payment",
            "day_payment_states", "day_remaining", "day_unsettled_payments", "match_by_md5",
            "match_by_bill_number"} <= set(LOOKUPS)


@pytest.mark.parametrize("name", LOOKUPS)
async def test_a_settlement_query_never_scans_every_settlement_line(db_dsn, name):
    from paysvc.db import init_connection
    from paysvc.queries import Q

    conn = await asyncpg.connect(db_dsn)
    try:
        await init_connection(conn)
        async with conn.transaction():
            await conn.execute(Q.staging_create)  # the import's temporary table, which some queries read
            await conn.execute("SET LOCAL enable_seqscan = off")  # a plan that can avoid a table must not read it
            sql = BLOCKS[name]
            stmt = await conn.prepare(sql)
            args = [SAMPLE[p.name] for p in stmt.get_parameters()]
            await conn.execute(f"PREPARE probe AS {sql}")
            literals = ", ".join(f"$${a if not isinstance(a, list) else '{' + ','.join(map(str, a)) + '}'}$$"
                                 f"::{p.name if not p.name.startswith('_') else p.name[1:] + '[]'}"
                                 for a, p in zip(args, stmt.get_parameters()))
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE probe({literals})" if args
                                       else "EXPLAIN (FORMAT JSON) EXECUTE probe")
    finally:
        await conn.close()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    assert "settlement_lines" not in _seq_scans(plan[0]["Plan"], []), json.dumps(plan)[:3000]
