"""`paysvc exceptions list|resolve`: treasury's exceptions from the command line, by the API's own rules."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys

from tests.payments_helpers import new_invoice, pay
from tests.service_process import free_port, service_env


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paysvc", "exceptions", *args], env=service_env(dsn, free_port()),
                          capture_output=True, text=True, timeout=60)


def refused(out: subprocess.CompletedProcess, *says: str) -> None:
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr
    for s in says:
        assert s in out.stderr, out.stderr


async def test_treasury_lists_and_resolves_an_exception_from_the_command_line(api, portal, invoice_body):
    for args, says in (((), "no exceptions"), (("--state", "open"), "no exceptions match")):
        none = cli(api.dsn, "list", *args)   # found by review: a traceback (TypeError) when there were none
        assert none.returncode == 0 and none.stdout == "" and says in none.stderr, none.stderr
    inv = await new_invoice(api, portal, invoice_body, amount=1000)
    assert (await (await pay(api.client, inv, amount=400, txid="CLI-SHORT")).json())["payments"][0]["exception"] \
        == "underpaid"
    out = cli(api.dsn, "list", "--state", "open")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["id", "reason", "state", "provider", "business_date", "amount", "payment_id",
                              "invoice_id"]
    assert "underpaid" in row and "open" in row and "sandbox" in row and "400 ៛" in row and inv["id"] in row
    exc_id = row.split()[0]
    [doc] = [json.loads(line) for line in cli(api.dsn, "list", "--json").stdout.splitlines()]
    assert doc["id"] == exc_id and doc["evidence"] and doc["amount"] == 400

    refused(cli(api.dsn, "list", "--reason", "underpayed"), "--reason 'underpayed' is not a reason", "underpaid")
    refused(cli(api.dsn, "list", "--limit", "0"), "'0' is not a number from 1 to 1000")
    refused(cli(api.dsn, "resolve", exc_id, "--action", "write_off", "--note", "x", "--invoice", inv["id"]),
            "--invoice: only match_to_invoice takes invoice_id")
    refused(cli(api.dsn, "resolve", exc_id, "--action", "match_to_invoice", "--note", "x"),
            "--invoice: match_to_invoice needs invoice_id")
    refused(cli(api.dsn, "resolve", exc_id, "--action", "refund_due", "--note", "   "), "--note: note must say why")
    refused(cli(api.dsn, "resolve", "exc_nope", "--action", "write_off", "--note", "x"),
            "no reconciliation exception 'exc_nope'")

    out = cli(api.dsn, "resolve", exc_id, "--action", "match_to_invoice", "--invoice", inv["id"], "--note",
              "the citizen pays the rest")
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert (done["state"], done["resolution"], done["resolved_by"]) == ("resolved", "match_to_invoice",
                                                                        f"cli:{getpass.getuser()}")
    assert {(p["account"], p["side"], p["amount"]) for p in done["postings"]} == {
        ("suspense:unmatched:KHR", "debit", 400), ("agency:MOI:revenue:KHR", "credit", 400)}
    got = await (await api.client.get(f"/v1/invoices/{inv['id']}", headers=portal)).json()
    assert (got["status"], got["amount_paid"]) == ("open", 400)  # as the API's resolution does
    refused(cli(api.dsn, "resolve", exc_id, "--action", "write_off", "--note", "again"), "already resolved")
    assert cli(api.dsn, "list", "--state", "open").stdout.splitlines()[1:] == []
