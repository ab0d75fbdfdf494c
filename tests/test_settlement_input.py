"""Settlement import input found wrong by treasury's review: each is refused with a 4xx (the command line: one
line, a non-zero exit) saying what to fix, never a 500 or a traceback; two files of one provider imported at
the same time are reconciled as if one came after the other."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from paysvc.capture import capture
from paysvc.db import connect
from paysvc.settlement_days import business_date, parse_cutoff
from providers.camt053 import write_statement
from providers.sandbox import write_settlement_csv
from tests.payments_helpers import new_invoice
from tests.test_cli_errors import assert_clean_failure, run
from tests.test_settlement import (DAY, AT, _notice, clearing, count, issued_before, line, paid, payment_ids,
                                   upload)


async def _lock_waiters(dsn: str) -> int:
    return await count(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'")


async def _until(predicate, what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


# 1. Two files of one provider imported at the same time.

@pytest.mark.parametrize("second_day", [DAY, DAY + timedelta(days=1)], ids=["same day", "next day"])
async def test_two_files_sharing_a_line_imported_at_once_settle_it_once(api, portal, treasury, invoice_body,
                                                                        second_day):
    """File A holds TX-S and a line whose payment a callback is capturing right now (so A waits, mid-import,
    for that callback). File B, sent meanwhile, holds TX-S too. B used to match TX-S as well, commit first,
    and A then failed with a 500 on the settle-once index. Now B waits for A and finds TX-S settled: a
    duplicate_in_settlement, as for files sent one after the other. A later day's file matches payments by
    transaction id too, so it waits as well."""
    await paid(api, portal, invoice_body, "TX-S")
    held = await issued_before(api.dsn, await new_invoice(api, portal, invoice_body, amount=50000), AT)
    file_a = write_settlement_csv([line("TX-S", 50000), line("TX-R", 50000, md5=held["khqr"]["md5"])])
    file_b = write_settlement_csv([line("TX-S", 50000), line("TX-S", 50000)] +
                                  [line(f"PAD-{i}", 1000 + i) for i in range(3)])
    async with connect(api.dsn) as conn:
        tx = conn.transaction()
        await tx.start()
        assert (await capture(conn, _notice(held, "TX-R"), source="callback", now=datetime.now(UTC))).created
        a = asyncio.create_task(upload(api, treasury, file_a))
        await _until(lambda: _lock_waiters(api.dsn), "import A waits for the callback")
        b = asyncio.create_task(upload(api, treasury, file_b, day=second_day))

        async def b_done_or_waiting() -> bool:
            return b.done() or await _lock_waiters(api.dsn) >= 2
        await _until(b_done_or_waiting, "import B is done or waits")
        await tx.commit()
    ra, rb = await a, await b
    assert (ra.status, rb.status) == (201, 201), (await ra.text(), await rb.text())
    rep_a, rep_b = await ra.json(), await rb.json()
    assert rep_a["lines_by_category"]["matched"]["count"] == 2, rep_a["lines_by_category"]
    assert rep_b["lines_by_category"]["duplicate_in_settlement"]["count"] == 2, rep_b["lines_by_category"]
    [tx_s] = await payment_ids(api.dsn, "TX-S")
    assert await count(api.dsn, "SELECT count(*) FROM settlement_lines WHERE payment_id = $1 "
                                "AND category <> 'duplicate_in_settlement'", tx_s) == 1
    # Settled once: clearing holds nothing of TX-S or TX-R (the padding was captured and settled in B).
    assert await clearing(api.dsn) == 0


# 2. The provider must be one the service knows.

async def test_a_provider_name_no_plugin_registers_is_refused_and_nothing_is_kept(api, portal, treasury,
                                                                                 invoice_body):
    data = write_settlement_csv([line("TX-NEW", 50000)])
    for provider in ("sandbx", "Sandbox"):
        r = await upload(api, treasury, data, provider=provider, fmt="sandbox")
        body = await r.json()
        assert r.status == 422, body
        assert f"provider {provider!r}" in body["detail"] and "sandbox" in body["detail"], body
        assert "bakong" in body["detail"], body                       # the valid names are listed
        assert body["errors"][0]["field"] == "provider", body
    for sql in ("SELECT count(*) FROM settlements", "SELECT count(*) FROM payments",
                "SELECT count(*) FROM reconciliation_exceptions",
                "SELECT count(*) FROM ledger_accounts WHERE code LIKE 'provider:sandbx:%'"):
        assert await count(api.dsn, sql) == 0, sql
    # The right name then imports the same file.
    r = await upload(api, treasury, data, provider="sandbox")
    assert r.status == 201, await r.text()


async def test_a_file_formats_name_is_refused_as_provider_and_nothing_is_kept(api, portal, treasury, invoice_body):
    # camt053 reads bank statements of other providers' payments; filed under its own name, every line was
    # reported missing_in_ledger against a clearing account no payment ever reaches.
    data = write_statement([line("TX-CAMT", 50000)])
    r = await upload(api, treasury, data, provider="camt053")
    body = await r.json()
    assert r.status == 422, body
    assert "'camt053' is a settlement file format" in body["detail"] and "format=camt053" in body["detail"], body
    assert body["errors"][0]["field"] == "provider" and body["errors"][0]["code"] == "format_only", body
    for sql in ("SELECT count(*) FROM settlements", "SELECT count(*) FROM reconciliation_exceptions",
                "SELECT count(*) FROM ledger_accounts WHERE code LIKE 'provider:camt053:%'"):
        assert await count(api.dsn, sql) == 0, sql
    # As the format of a provider's payments, the same file imports.
    r = await upload(api, treasury, data, provider="sandbox", fmt="camt053")
    assert r.status == 201, await r.text()


def test_the_cli_refuses_a_file_formats_name_as_provider_in_one_line(db_dsn, tmp_path):
    f = tmp_path / "s.xml"
    f.write_bytes(write_statement([line("TX-1", 50000)]))
    out = run(db_dsn, "settlements", "import", "--provider", "camt053", "--date", "2025-06-02", str(f))
    assert_clean_failure(out, 1, "'camt053' is a settlement file format", "format=camt053")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_cli_refuses_an_unknown_provider_in_one_line(db_dsn, tmp_path):
    f = tmp_path / "s.csv"
    f.write_bytes(write_settlement_csv([line("TX-1", 50000)]))
    for provider in ("Sandbox", "sandbx"):
        out = run(db_dsn, "settlements", "import", "--provider", provider, "--format", "sandbox", "--date",
                  "2025-06-02", str(f))
        assert_clean_failure(out, 1, f"provider {provider!r}", "bakong, ")
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# 3. The command line takes the API's business dates.

@pytest.mark.parametrize("day", ["1999-01-01", "9999-12-31", "0001-01-01", "2100-01-01"])
def test_the_cli_refuses_a_business_date_the_api_refuses(db_dsn, tmp_path, day):
    f = tmp_path / "s.csv"
    f.write_bytes(write_settlement_csv([line("TX-1", 50000)]))
    out = run(db_dsn, "settlements", "import", "--provider", "sandbox", "--date", day, str(f))
    assert_clean_failure(out, 1, "between 2000-01-01 and 2099-12-31", day)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("day", ["24/11/2026", "20261124", "2026-W48-2", "2026-11-24T00:00"])
def test_the_cli_says_what_a_date_that_is_not_a_date_should_be(db_dsn, tmp_path, day):
    # The API takes only YYYY-MM-DD; so does the command line (Python alone would read 20261124 and 2026-W48-2).
    f = tmp_path / "s.csv"
    f.write_bytes(write_settlement_csv([line("TX-1", 50000)]))
    out = run(db_dsn, "settlements", "import", "--provider", "sandbox", "--date", day, str(f))
    assert_clean_failure(out, 1, repr(day), "YYYY-MM-DD")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


async def test_the_api_says_which_business_dates_it_takes(api, treasury):
    r = await upload(api, treasury, write_settlement_csv([]), day=DAY.replace(year=1999))
    body = await r.json()
    assert r.status == 422, body
    assert body["errors"][0]["field"] == "business_date", body
    assert "between 2000-01-01 and 2099-12-31" in body["errors"][0]["message"], body


def test_the_cli_recheck_refuses_a_day_out_of_range_in_one_line(db_dsn):
    out = run(db_dsn, "settlements", "recheck", "--today", "0001-01-01")
    assert_clean_failure(out, 1, "between 2000-01-01 and 2099-12-31")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("fmt", [[], ["--csv"]])
def test_the_cli_report_of_an_unknown_settlement_says_so_in_one_line(db_dsn, fmt):
    # Found by review: with --csv it printed a traceback (TypeError) instead.
    out = run(db_dsn, "settlements", "report", "stl_nope", *fmt)
    assert_clean_failure(out, 1, "no settlement 'stl_nope'")
    assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == "", (out.stdout, out.stderr)


# 4. Paging the report's lines.

async def test_a_report_without_lines_points_at_the_first_line(api, portal, treasury, invoice_body):
    data = write_settlement_csv([line(f"TX-{i}", 1000 + i) for i in range(3)])  # physical lines 2, 3, 4
    r = await upload(api, treasury, data)
    assert r.status == 201, await r.text()
    sid = (await r.json())["id"]

    async def page(**params) -> dict:
        r = await api.client.get(f"/v1/settlements/{sid}", params=params, headers=treasury)
        assert r.status == 200, await r.text()
        return await r.json()

    empty = await page(lines_limit=0)
    assert empty["lines"] == [] and empty["next_after_line"] == 0, empty["next_after_line"]
    seen, after = [], empty["next_after_line"]
    while after is not None:
        p = await page(lines_limit=2, after_line=after)
        seen += [ln["line_no"] for ln in p["lines"]]
        after = p["next_after_line"]
    assert seen == [2, 3, 4]
    assert (await page(lines_limit=0, after_line=2))["next_after_line"] == 2
    assert (await page(lines_limit=0, after_line=4))["next_after_line"] is None   # nothing after line 4


def test_the_cli_import_report_does_not_skip_the_first_line(db_dsn, tmp_path):
    f = tmp_path / "s.csv"
    f.write_bytes(write_settlement_csv([line("TX-1", 1000), line("TX-2", 2000)]))
    out = run(db_dsn, "settlements", "import", "--provider", "sandbox", "--date", "2025-06-02", str(f))
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["lines"] == [] and rep["next_after_line"] == 0, rep["next_after_line"]


# 5. A NUL names its line.

@pytest.mark.parametrize("where", ["transaction_id", "quoted", "bill_number"])
async def test_a_nul_in_a_csv_field_names_its_line(api, treasury, where):
    header = write_settlement_csv([]).decode().splitlines()[0]
    bad = {"transaction_id": "TX-\x00,,,5000,KHR,2025-06-02T03:00:00Z,0",
           "quoted": '"TX-\x00",,,5000,KHR,2025-06-02T03:00:00Z,0',
           "bill_number": "TX-3,,PS1\x0023,5000,KHR,2025-06-02T03:00:00Z,0"}[where]
    data = f"{header}\nTX-1,,,5000,KHR,2025-06-02T03:00:00Z,0\n{bad}\n".encode()
    r = await upload(api, treasury, data)
    body = await r.json()
    assert r.status == 422, body
    assert "line 3" in body["detail"] and "NUL" in body["detail"] and body["line"] == 3, body
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0


def test_every_settlement_csv_format_names_the_line_of_a_nul():
    """Sandbox and Bakong files are read by the same CSV reader."""
    from providers import SettlementFormatError
    from providers.settlement_csv import rows

    data = b"a,b\n1,2\n\n\"x\ny\",\"\x00\"\n"                 # the NUL is on physical line 5
    with pytest.raises(SettlementFormatError) as got:
        list(rows(data, ("a", "b"), provider="bakong"))
    assert got.value.line_no == 5 and "NUL" in got.value.reason


# 6. The same bytes under another format.

async def test_the_same_file_with_another_format_is_refused_naming_the_first(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    data = write_statement([line("TX-1", 50000)])
    first = await upload(api, treasury, data, fmt="camt053")
    assert first.status == 201, await first.text()
    sid = (await first.json())["id"]
    other = await upload(api, treasury, data)                 # format: the provider's own, sandbox
    body = await other.json()
    assert other.status == 409, body
    assert "format camt053" in body["detail"] and sid in body["detail"], body
    assert body["settlement_id"] == sid
    again = await upload(api, treasury, data, fmt="camt053")  # the same file, the same format: a replay
    assert again.status == 200 and (await again.json())["replayed"] is True
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 1


async def test_the_same_file_under_its_provider_default_and_named_format_is_a_replay(api, portal, treasury,
                                                                                    invoice_body):
    """Leaving format out means the provider's own: naming it is the same import."""
    await paid(api, portal, invoice_body, "TX-1")
    data = write_settlement_csv([line("TX-1", 50000)])
    assert (await upload(api, treasury, data)).status == 201
    again = await upload(api, treasury, data, fmt="sandbox")
    assert again.status == 200 and (await again.json())["replayed"] is True


# Found by an API fuzz audit: each of these was a 500.

def _multipart(parts: list[bytes], boundary: str = "BND") -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _field(name: str, value: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()


async def test_a_nested_multipart_part_is_refused(api, treasury):
    nested = (b'Content-Disposition: form-data; name="file"\r\nContent-Type: multipart/mixed; boundary=INNER\r\n\r\n'
              b"--INNER\r\nContent-Type: text/plain\r\n\r\nx\r\n--INNER--")
    body, headers = _multipart([_field("provider", "sandbox"), _field("business_date", DAY.isoformat()), nested])
    r = await api.client.post("/v1/settlements", data=body, headers={**treasury, **headers})
    assert r.status == 422 and "itself multipart" in (await r.json())["detail"], await r.text()
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0


async def test_a_nul_in_a_part_header_is_a_form_that_cannot_be_read(api, treasury):
    part = b'Content-Disposition: form-data; name="file"; filename="a\x00b"\r\n\r\nx'
    body, headers = _multipart([_field("provider", "sandbox"), _field("business_date", DAY.isoformat()), part])
    r = await api.client.post("/v1/settlements", data=body, headers={**treasury, **headers})
    assert r.status == 400 and "cannot be read" in (await r.json())["detail"], await r.text()
    # the treasury login form, which anyone may post, the same
    body, headers = _multipart([b'Content-Disposition: form-data; name="key"; x="a\x00b"\r\n\r\nk'])
    r = await api.client.post("/treasury/login", data=body,
                              headers={**headers, "Origin": str(api.client.make_url("")).rstrip("/")})
    assert r.status == 400, await r.text()


@pytest.mark.parametrize("name, says", [("x" * 256 + ".csv", "at most 255"), ("a\tb.csv", "control characters")])
async def test_a_file_name_that_cannot_be_kept_is_refused_saying_why(api, treasury, name, says):
    def file_part(file_name: str) -> bytes:  # the name as curl -F sends it: raw UTF-8, not percent-encoded
        return (f'Content-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                'Content-Type: text/csv\r\n\r\n').encode() + write_settlement_csv([line("TX-N", 50000)])

    body, headers = _multipart([_field("provider", "sandbox"), _field("business_date", DAY.isoformat()),
                                file_part(name)])
    r = await api.client.post("/v1/settlements", data=body, headers={**treasury, **headers})
    body = await r.json()
    assert r.status == 422 and says in body["detail"] and body["errors"][0]["field"] == "file", body
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0
    # a Khmer name (with the zero-width space Khmer separates words with), sent as curl -F sends it, is kept
    khmer = "របាយការណ៍\u200bទូទាត់" * 7 + ".csv"
    body, headers = _multipart([_field("provider", "sandbox"), _field("business_date", DAY.isoformat()),
                                file_part(khmer)])
    r = await api.client.post("/v1/settlements", data=body, headers={**treasury, **headers})
    assert r.status == 201, await r.text()
    assert await count(api.dsn, "SELECT file_name FROM settlements") == khmer


async def test_a_provider_that_reads_no_settlement_file_is_refused_as_its_format(db_dsn):
    from tests.conftest import running_api

    async with running_api(db_dsn, providers="sandbox,aba_payway", aba_merchant_id="ec-moi",
                           aba_api_key="aba-key", aba_base_url="http://127.0.0.1:9") as api:
        headers = {"Authorization": f"Bearer {await api.key(None, scopes=['treasury'])}"}
        r = await upload(api, headers, write_settlement_csv([line("TX-A", 50000)]), fmt="aba_payway")
        body = await r.json()
        assert r.status == 422 and "'aba_payway' has no settlement file format" in body["detail"], body
        assert body["errors"][0] == {"field": "format", "message": "no settlement file format", "code": "unsupported"}
        assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0


@pytest.mark.parametrize("written", ["1700000000", "2026-1-5", "24/11/2026", "2026-11-24T00:00:00"])
async def test_a_business_date_not_written_yyyy_mm_dd_says_how_to_write_it(api, treasury, written):
    # Found by a fuzz audit: 1700000000 was read as seconds since 1970, then refused in pydantic's words.
    body, headers = _multipart([_field("provider", "sandbox"), _field("business_date", written),
                                b'Content-Disposition: form-data; name="file"; filename="s.csv"\r\n\r\n'
                                + write_settlement_csv([line("TX-D", 50000)])])
    r = await api.client.post("/v1/settlements", data=body, headers={**treasury, **headers})
    problem = await r.json()
    assert r.status == 422 and problem["errors"][0]["field"] == "business_date", problem
    assert "must be a date written YYYY-MM-DD" in problem["errors"][0]["message"], problem


# 7. Found by a treasury walk-through: errors that did not say what to fix, and an argument silently ignored.

@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
async def test_a_utf16_file_is_refused_for_its_encoding(api, treasury, encoding):
    data = write_settlement_csv([line("TX-1", 5000)]).decode().encode(encoding)
    r = await upload(api, treasury, data)
    body = await r.json()
    assert r.status == 422 and "UTF-16" in body["detail"] and "UTF-8" in body["detail"], body
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0


async def test_a_line_broken_by_a_rule_over_the_whole_line_says_it_in_its_own_words(api, treasury):
    r = await upload(api, treasury, write_settlement_csv([]) + b"TX-1,,,100,KHR,2025-06-02T03:00:00Z,200\n")
    body = await r.json()
    assert r.status == 422, body
    assert body["detail"].startswith("line 2: fee 200 is larger than the amount 100;"), body


async def test_an_unknown_provider_is_told_the_providers_payments_are_captured_under(api, treasury):
    r = await upload(api, treasury, write_settlement_csv([line("TX-1", 5000)]), provider="sandbx")
    body = await r.json()
    assert r.status == 422 and "sandbox" in body["detail"] and "camt053" not in body["detail"], body


async def test_an_invoice_given_with_an_action_that_takes_none_is_refused(api, portal, treasury, invoice_body):
    await paid(api, portal, invoice_body, "TX-1")
    await upload(api, treasury, write_settlement_csv([line("TX-1", 49000)]))
    exc = (await (await api.client.get("/v1/reconciliation/exceptions", headers=treasury)).json())["data"][0]
    for action in ("write_off", "refund_due"):
        r = await api.client.post(f"/v1/reconciliation/exceptions/{exc['id']}/resolve", headers=treasury,
                                  json={"action": action, "note": "n", "invoice_id": exc["invoice_id"]})
        body = await r.json()
        assert r.status == 422 and body["errors"][0]["field"] == "invoice_id", body
        assert body["errors"][0]["message"].startswith(f"only match_to_invoice takes invoice_id; {action} "), body
    assert await count(api.dsn, "SELECT count(*) FROM reconciliation_exceptions WHERE state = 'open'") == 1


async def test_a_business_date_that_has_not_begun_is_refused(api, treasury):
    from paysvc.invoicing import now_utc

    today = business_date(now_utc(), parse_cutoff("23:59:59.999"))
    data = write_settlement_csv([line("TX-1", 5000)])
    # two days ahead: still ahead if the business day turns while the test runs (today is the day after then)
    r = await upload(api, treasury, data, day=today + timedelta(days=2))
    body = await r.json()
    assert r.status == 422 and body["errors"][0]["code"] == "in_the_future", body
    assert "has not begun yet: today is " in body["detail"], body
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0
    assert (await upload(api, treasury, data, day=today)).status == 201


_FILE_PART = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"day.csv\"\r\n\r\n"


async def _upload_by_hand(api, key: str, *, length: int, first: bytes, piece: bytes = b"", every: float = 0,
                          times: int = 0) -> bytes:
    """A settlement upload sent over a socket of its own: headers announcing ``length`` bytes of multipart body,
    ``first``, then ``piece`` at once and every ``every`` seconds, ``times`` times or until the service hangs up;
    the start of its answer (within 5 s of the last piece)."""
    reader, writer = await asyncio.open_connection(api.client.server.host, api.client.server.port)
    try:
        writer.write(b"POST /v1/settlements HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() +
                     b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: " + str(length).encode() +
                     b"\r\n\r\n" + first)
        await writer.drain()
        for _ in range(times):
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(every)
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("sent", ["headers", "file"])
async def test_an_upload_that_stalls_is_given_up_with_408_and_frees_its_slot(db_dsn, monkeypatch, sent):
    """Found by a review of the docs: the file was read with no time limit, so an upload that stopped sending held
    its admission slot for as long as its client kept the connection open. A file may take long to come whole;
    one that sends nothing for BODY_SECONDS is given up."""
    import paysvc.web
    from tests.conftest import running_api

    monkeypatch.setattr(paysvc.web, "BODY_SECONDS", 1.0)
    async with running_api(db_dsn, max_concurrent_requests=1, request_queue_seconds=0.2) as api:
        key = await api.key(None, scopes=["treasury"], name="Treasury desk")
        body = (b"--b\r\nContent-Disposition: form-data; name=\"provider\"\r\n\r\nsandbox\r\n"
                b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"day.csv\"\r\n"
                b"Content-Type: text/csv\r\n\r\n")
        if sent == "file":
            body += b"transaction_id,amount,currency\r\nTX-1,5"
        answer = await _upload_by_hand(api, key, length=100_000, first=body)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"urn:paysvc:problem:request-timeout" in answer and b"nothing came for 1 s" in answer
        r = await api.client.get("/v1/settlements", headers={"Authorization": f"Bearer {key}"})  # the slot is free
        assert r.status == 200, await r.text()
        assert await count(db_dsn, "SELECT count(*) FROM settlements") == 0


async def test_an_upload_that_trickles_is_given_up_with_408_and_frees_its_slot(db_dsn, monkeypatch):
    """Found by review: the limit was on silence only, so a few bytes every half second held the slot as long as
    a stalled upload had."""
    import paysvc.web
    from tests.conftest import running_api

    monkeypatch.setattr(paysvc.web, "BODY_SECONDS", 1.0)
    async with running_api(db_dsn, max_concurrent_requests=1, request_queue_seconds=0.2) as api:
        key = await api.key(None, scopes=["treasury"], name="Treasury desk")
        # 256 bytes a second, until the answer comes
        answer = await _upload_by_hand(api, key, length=100_000, first=_FILE_PART, piece=b"x" * 128, every=0.5, times=8)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"the upload is too slow" in answer
        r = await api.client.get("/v1/settlements", headers={"Authorization": f"Bearer {key}"})  # the slot is free
        assert r.status == 200, await r.text()


async def test_an_upload_that_takes_longer_than_its_limit_is_given_up_even_at_a_steady_rate(db_dsn, monkeypatch):
    """Found by review: the average rate alone let a client sending 16 KiB/s hold a slot for the 9 hours the
    largest file takes at that rate."""
    import paysvc.api_settlements
    import paysvc.web
    from tests.conftest import running_api

    monkeypatch.setattr(paysvc.web, "BODY_SECONDS", 0.5)
    monkeypatch.setattr(paysvc.api_settlements, "MAX_UPLOAD_SECONDS", 2)
    async with running_api(db_dsn) as api:
        key = await api.key(None, scopes=["treasury"], name="Treasury desk")
        # 64 KiB every 0.1 s: well above the average the rate rule asks
        answer = await _upload_by_hand(api, key, length=100_000_000, first=_FILE_PART, piece=b"x" * 65536, every=0.1,
                                       times=30)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"the upload took more than" in answer
