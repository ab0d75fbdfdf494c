"""The camt.053 reader refuses what could make its parser expand entities, in any encoding, and the import
parses off the event loop; a batch entry's transactions are told apart."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from providers.camt053 import create as camt053
from providers.errors import SettlementFormatError
from tests.test_settlement import DAY, count, line, upload

ENTITY = ('<!DOCTYPE Document [<!ENTITY a "' + "x" * 1000 + '"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
          '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>')


def statement(md5: str = "0" * 32) -> str:
    """A UTF-8 statement with one credit line, as text."""
    from providers.camt053 import write_statement
    return write_statement([line("TX-1", 5000, md5=md5)]).decode("utf-8")


def with_entities(text: str) -> str:
    """``text`` with a document type declaration whose entity expands to 100,000 characters, used in the
    remittance information."""
    head, body = text.split("\n", 1)
    return (head + "\n" + ENTITY + "\n" + body).replace("<Ustrd>", "<Ustrd>&c;", 1)


def read(data: bytes):
    return list(camt053({}).parse_settlement(data))


def test_a_plain_statement_reads_with_or_without_a_utf8_byte_order_mark():
    text = statement()
    assert [ln.amount for ln in read(text.encode("utf-8"))] == [5000]
    assert [ln.amount for ln in read(b"\xef\xbb\xbf" + text.encode("utf-8"))] == [5000]
    assert [ln.amount for ln in read(text.replace('encoding="UTF-8"', "encoding='us-ascii'").encode())] == [5000]


def test_a_document_type_declaration_is_refused():
    with pytest.raises(SettlementFormatError, match="document type declaration is not allowed") as refused:
        read(with_entities(statement()).encode("utf-8"))
    assert refused.value.line_no == 2


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_entities_in_utf16_or_utf32_are_refused_before_the_parser_reads_them(encoding):
    # Found by a security review: in UTF-16 the declaration is not the bytes "<!DOCTYPE", and the parser,
    # reading the encoding from the byte order mark or the declaration, expanded the entities.
    text = with_entities(statement()).replace('encoding="UTF-8"', f'encoding="{encoding.upper()[:6]}"')
    with pytest.raises(SettlementFormatError, match="read as UTF-8: convert"):
        read(text.encode(encoding))


@pytest.mark.parametrize("encoding", ["ISO-8859-1", "windows-1252", "cp500"])
def test_a_statement_declared_in_another_encoding_is_refused_naming_it(encoding):
    text = statement().replace('encoding="UTF-8"', f'encoding="{encoding}"')
    with pytest.raises(SettlementFormatError) as refused:
        read(text.encode("cp500" if encoding == "cp500" else "ascii"))
    if encoding == "cp500":  # EBCDIC: not UTF-8 text at all
        assert "is not UTF-8 text" in refused.value.reason and refused.value.line_no == 1
    else:
        assert f"encoding='{encoding}'" in refused.value.reason and refused.value.line_no == 1


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_a_byte_that_is_not_utf8_is_named_with_its_line(newline):
    text = statement().replace("<Ustrd>", "<Ustrd>caf\N{LATIN SMALL LETTER E WITH ACUTE}", 1)
    data = text.replace("\n", newline).encode("latin-1")
    with pytest.raises(SettlementFormatError) as refused:
        read(data)
    bad = data.index(b"\xe9")
    assert refused.value.line_no == len(data[:bad].splitlines()) > 1  # as the reader numbers its lines
    assert f"byte {bad + 1} is not UTF-8 text" in refused.value.reason
    doctype = with_entities(statement()).replace("\n", newline).encode()
    with pytest.raises(SettlementFormatError, match="document type") as refused:
        read(doctype)
    assert refused.value.line_no == 2


async def test_an_entity_file_in_utf16_is_a_clear_422_and_nothing_is_imported(api, treasury):
    data = with_entities(statement()).replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")
    r = await upload(api, treasury, data, fmt="camt053", name="stmt.xml")
    body = await r.json()
    assert r.status == 422 and "UTF-16 or UTF-32" in body["detail"] and "nothing was imported" in body["detail"], body
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0


async def test_an_import_reads_its_file_off_the_event_loop(api):
    # A large or hostile file parsed on the event loop held every other request of the instance.
    import asyncpg

    from paysvc.api_settlements import rules_of
    from paysvc.db import init_connection
    from paysvc.settlement_import import import_settlement
    from paysvc.web import SETTINGS

    threads = []

    def lines():
        for n in range(3):
            threads.append(threading.get_ident())
            yield line(f"TX-{n}", 5000).model_copy(update={"line_no": n + 1})

    conn = await asyncpg.connect(api.dsn)
    try:
        await init_connection(conn)
        async with conn.transaction():
            await import_settlement(conn, lines(), data_sha256=bytes(32), file_size=0, provider="sandbox",
                                    fmt="sandbox", business_date=DAY, file_name=None, imported_by="test",
                                    now=datetime.now(UTC), rules=rules_of(api.client.app[SETTINGS]))
    finally:
        await conn.close()
    assert len(threads) == 3 and threading.get_ident() not in threads


async def test_a_plugin_that_parses_its_whole_file_when_called_does_so_off_the_event_loop(api):
    from paysvc.api_settlements import run_import
    from paysvc.web import POOL, PROVIDERS, SETTINGS

    class Eager:  # parse_settlement returns a list: the whole file is read in the call itself
        name, pattern, captures_payments = "eager", "signed_push", False

        def __init__(self):
            self.threads = []

        def parse_settlement(self, data):
            self.threads.append(threading.get_ident())
            return [line("TX-1", 5000)]

    eager = Eager()
    app = api.client.app
    done = await run_import(app[POOL], {**app[PROVIDERS], "eager": eager}, app[SETTINGS], provider="sandbox",
                            fmt="eager", day=DAY, data=b"anything", file_name=None, imported_by="test")
    assert done.created and len(eager.threads) == 1 and threading.get_ident() not in eager.threads


def batch_statement(entry_refs: str, txs: list[str], stmt: str = "S1") -> bytes:
    """One booked credit entry (a batch) with the given references and one TxDtls per item of ``txs``, each of
    5,000 riel with no references of its own; an item is the TxDtls's Refs content."""
    details = "".join(f'<TxDtls><Refs>{refs}</Refs><Amt Ccy="KHR">5000</Amt><RmtInf><Ustrd>fee {k}</Ustrd></RmtInf>'
                      "</TxDtls>" for k, refs in enumerate(txs, start=1))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"><BkToCstmrStmt>'
            "<GrpHdr><MsgId>STMT</MsgId><CreDtTm>2025-06-02T08:00:00+07:00</CreDtTm></GrpHdr>"
            f"<Stmt><Id>{stmt}</Id><Acct><Id><Othr><Id>KH00NBC0001</Id></Othr></Id></Acct>"
            f'<Ntry><Amt Ccy="KHR">{5000 * len(txs)}</Amt><CdtDbtInd>CRDT</CdtDbtInd><Sts><Cd>BOOK</Cd></Sts>'
            f"<BookgDt><DtTm>2025-06-02T10:00:00+07:00</DtTm></BookgDt>{entry_refs}"
            f"<NtryDtls>{details}</NtryDtls></Ntry></Stmt></BkToCstmrStmt></Document>\n").encode()


@pytest.mark.parametrize("entry_refs, base", [
    ("<AcctSvcrRef>BANK7</AcctSvcrRef><NtryRef>N-7</NtryRef>", "BANK7"),
    ("<NtryRef>N-7</NtryRef>", "N-7"),
])
def test_the_transactions_of_a_batch_entry_without_references_of_their_own_are_told_apart(entry_refs, base):
    """Found by a review of the docs: they all took the entry's NtryRef as their id, so of those that matched no
    payment all but the first were raised as duplicate_in_settlement, which treasury may write off as a listing
    error though each was money that arrived. A transaction's own reference still wins."""
    lines = read(batch_statement(entry_refs, ["", "", "<TxId>T-3</TxId>", "<AcctSvcrRef>B-4</AcctSvcrRef>"]))
    assert [(x.transaction_id, x.id_is_reference) for x in lines] == [
        (f"{base}/1", True), (f"{base}/2", True), ("T-3", False), ("B-4", True)]
    assert [x.reference for x in lines] == [None, None, None, "B-4"]


async def test_a_batch_entry_paying_no_invoice_we_know_is_captured_line_by_line_not_as_duplicates(api, treasury):
    r = await upload(api, treasury, batch_statement("<NtryRef>N-7</NtryRef>", ["", "", ""]), fmt="camt053",
                     name="stmt.xml")
    assert r.status == 201, await r.text()
    by_category = (await r.json())["lines_by_category"]
    assert {k: v["count"] for k, v in by_category.items() if v["count"]} == {"missing_in_ledger": 3}
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 3


async def test_batch_lines_of_two_statements_numbering_their_entries_alike_stay_apart(api, treasury):
    """Found by review: a bank may number each statement's entries from 1 (NtryRef), so a batch line named by it
    took the id of the line of an earlier day's statement, and was raised as duplicate_in_settlement. The bank's
    own reference for the entry comes first."""
    from datetime import timedelta

    day1 = batch_statement("<AcctSvcrRef>BANK-D1</AcctSvcrRef><NtryRef>1</NtryRef>", ["", ""])
    day2 = batch_statement("<AcctSvcrRef>BANK-D2</AcctSvcrRef><NtryRef>1</NtryRef>", ["", ""])
    assert (await upload(api, treasury, day1, fmt="camt053", name="d1.xml")).status == 201
    r = await upload(api, treasury, day2, fmt="camt053", name="d2.xml", day=DAY + timedelta(days=1))
    assert r.status == 201, await r.text()
    got = {k: v["count"] for k, v in (await r.json())["lines_by_category"].items() if v["count"]}
    assert got == {"missing_in_ledger": 2}
    assert await count(api.dsn, "SELECT count(*) FROM payments") == 4


def test_a_line_number_moved_up_leaves_errors_naming_the_physical_line():
    """Found by review: once a transaction shared the line of the one before, the numbers after it ran one ahead,
    and an error named the line after the fault."""
    head = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08"><BkToCstmrStmt>\n'
            "<Stmt><Id>S1</Id>\n")

    def ntry(ref: str, inner: str = "", ccy: str = "KHR") -> str:
        return (f'<Ntry><Amt Ccy="{ccy}">5000</Amt><CdtDbtInd>CRDT</CdtDbtInd><Sts><Cd>BOOK</Cd></Sts>'
                f"<NtryRef>{ref}</NtryRef>{inner}")

    tx = '<TxDtls><Amt Ccy="KHR">5000</Amt></TxDtls>'
    lines = [head + ntry("B1", "<NtryDtls>"),                    # lines 1-4
             tx,                                                 # 5
             tx + "</NtryDtls></Ntry>" + ntry("S2") + "</Ntry>",  # 6: a transaction and the next entry
             ntry("S3") + "</Ntry>"]                             # 7
    good = "\n".join(lines + ["</Stmt></BkToCstmrStmt></Document>\n"]).encode()
    assert [x.line_no for x in read(good)] == [5, 6, 7, 8]      # numbers of their own, S3's one ahead
    bad = "\n".join(lines + [ntry("S4", ccy="EUR") + "</Ntry>", "</Stmt></BkToCstmrStmt></Document>\n"]).encode()
    with pytest.raises(SettlementFormatError) as refused:
        read(bad)
    assert refused.value.line_no == 8                           # where S4 is, not 9


@pytest.mark.parametrize("pieces", [True, False])
def test_a_long_line_is_read_a_piece_at_a_time(monkeypatch, pieces):
    """A statement without line breaks: its first entries are read before the parser has seen the rest (fed
    whole, a fault at its very end stopped it before the first). Found by review: no test told them apart."""
    import providers.camt053
    from providers.camt053 import write_statement

    flat = write_statement([line(f"TX-{i}", 1000 + i) for i in range(1, 6)]).replace(b"\n", b"")
    broken = flat.replace(b"</Document>", b"</Documen>")  # not well-formed at its very end
    monkeypatch.setattr(providers.camt053, "_FEED", 64 if pieces else 1 << 40)
    read_first = camt053({}).parse_settlement(broken)
    if pieces:
        assert next(read_first).transaction_id == "TX-1"
    else:
        with pytest.raises(SettlementFormatError):
            next(read_first)


def test_a_statement_without_line_breaks_reads_as_it_would_with_them(monkeypatch):
    """Found by a review: every transaction of such a file took line number 1, and its import failed with a
    database error (two lines of one number). Each now takes the next number up; and a long line is fed to the
    parser a piece at a time, so its entries are read as they come."""
    import providers.camt053
    from providers.camt053 import write_statement

    pretty = write_statement([line(f"TX-{i}", 1000 + i) for i in range(1, 6)])
    flat = pretty.replace(b"\n", b"")
    monkeypatch.setattr(providers.camt053, "_FEED", 64)
    got = read(flat)
    assert [(x.transaction_id, x.amount) for x in got] == [(x.transaction_id, x.amount) for x in read(pretty)]
    assert [x.line_no for x in got] == [1, 2, 3, 4, 5]


async def test_a_statement_without_line_breaks_is_imported(api, treasury):
    from providers.camt053 import write_statement

    flat = write_statement([line(f"TX-{i}", 1000 + i) for i in range(1, 4)]).replace(b"\n", b"")
    r = await upload(api, treasury, flat, fmt="camt053", name="stmt.xml")
    assert r.status == 201, await r.text()
    assert [ln["line_no"] for ln in (await r.json())["lines"]] == [1, 2, 3]


async def test_a_plugin_that_numbers_two_lines_alike_is_refused_as_its_own_defect(api):
    """Any plugin: lines are keyed by their numbers, and two of one number failed the import with a database error."""
    from paysvc.api_settlements import rules_of
    from paysvc.db import connect
    from paysvc.settlement_import import import_settlement
    from paysvc.web import SETTINGS

    twice = [line("TX-1", 1000).model_copy(update={"line_no": 2}), line("TX-2", 1000).model_copy(update={"line_no": 2})]
    async with connect(api.dsn) as conn:
        with pytest.raises(SettlementFormatError, match="a defect of the plugin, not of the file") as raised:
            async with conn.transaction():
                await import_settlement(conn, twice, data_sha256=b"x" * 32, file_size=1, provider="sandbox",
                                        fmt="sandbox", business_date=DAY, file_name=None, imported_by="test",
                                        now=datetime.now(UTC), rules=rules_of(api.client.app[SETTINGS]))
    assert raised.value.line_no == 2
    assert await count(api.dsn, "SELECT count(*) FROM settlements") == 0


@pytest.mark.parametrize("entry_refs, txs", [
    ("<NtryRef>1</NtryRef>", [""]),                                   # an entry named only by its number
    ("<AcctSvcrRef>BANK-9</AcctSvcrRef><NtryRef>1</NtryRef>", ["", ""]),  # a batch named by the bank's reference
])
async def test_a_statement_reissued_under_a_new_id_books_its_entries_once(api, treasury, entry_refs, txs):
    """Found by review: when a line's id took the statement's Stmt/Id, a statement re-issued or corrected under a
    new one gave its entries new ids, and they were captured and posted a second time."""
    first = batch_statement(entry_refs, txs, stmt="STMT-0602")
    again = batch_statement(entry_refs, txs, stmt="STMT-0602-R1")
    assert (await upload(api, treasury, first, fmt="camt053", name="d.xml")).status == 201
    r = await upload(api, treasury, again, fmt="camt053", name="d-corrected.xml")
    assert r.status == 201, await r.text()
    got = {k: v["count"] for k, v in (await r.json())["lines_by_category"].items() if v["count"]}
    assert got == {"duplicate_in_settlement": len(txs)}  # raised for treasury, not booked again
    assert await count(api.dsn, "SELECT count(*) FROM payments") == len(txs)
