"""ISO 20022 camt.053 bank-to-customer statements, read as settlement files (settlement only).

Any ``camt.053.001.xx`` version: elements are found by local name inside the document's namespace
(``urn:iso:std:iso:20022:tech:xsd:camt.053.001.NN``). Standard library only (``xml.etree.ElementTree``);
the file must be UTF-8 and a document type declaration is refused, so no entity can expand.

Mapping (one :class:`SettlementLine` per transaction)
    * Only ``Ntry`` with ``CdtDbtInd`` = ``CRDT``, status ``BOOK`` (``<Sts>BOOK</Sts>`` or
      ``<Sts><Cd>BOOK</Cd></Sts>``) and no ``RvslInd`` = true. Debits, pending and reversal entries are
      skipped: money leaving the account is not a settlement of payments.
    * An entry with several ``NtryDtls/TxDtls`` (a batch booking) gives one line per ``TxDtls``; an entry
      with none gives one line from the entry itself.
    * ``amount``: ``TxDtls/Amt``, else ``TxDtls/AmtDtls/TxAmt/Amt``, else (one transaction) ``Ntry/Amt``, in
      minor units by the currency's exponent (KHR 0, USD 2; ``12.505`` USD is refused). Currency from ``Ccy``.
    * ``transaction_id``: ``Refs/EndToEndId`` (unless ``NOTPROVIDED``), else ``Refs/TxId``, else
      ``Refs/AcctSvcrRef``, else the entry's reference: for an entry of one transaction its ``AcctSvcrRef``,
      else its ``NtryRef``; for the k-th transaction of a batch entry ``{AcctSvcrRef}/{k}`` (else
      ``{NtryRef}/{k}``), so that no two lines share it. In these last cases ``id_is_reference``: the
      bank's reference, not a transaction id the provider's callbacks give.
    * ``reference``: the bank's own reference: ``Refs/AcctSvcrRef``, else (an entry of one transaction) the
      entry's ``AcctSvcrRef``.
    * ``bill_number``: ``RmtInf/Strd/CdtrRefInf/Ref``, else a ``PS`` + 8–23 digits token in ``RmtInf/Ustrd``.
    * ``md5``: a 32-hex-digit token in ``RmtInf/Ustrd`` (the KHQR code's md5), when present.
    * ``fee``: ``TxDtls/Chrgs/TtlChrgsAndTaxAmt``, else the sum of ``TxDtls/Chrgs/Rcrd/Amt``; for an entry
      with at most one transaction the entry's ``Chrgs`` count too. Charges must be in the line's currency.
    * ``paid_at``: ``TxDtls/RltdDts/AccptncDtTm``, else ``Ntry/BookgDt/DtTm``, else ``Ntry/ValDt/DtTm``; a
      date-time without an offset is Cambodia time (+07:00); a date alone gives no ``paid_at``.
    * ``line_no``: the physical line where the transaction's ``TxDtls`` (or its ``Ntry``) starts.

This plugin is settlement only: ``pattern`` is ``signed_push`` because the registry requires one, and
every callback is refused as unsupported.
"""

from __future__ import annotations

import codecs
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import ValidationError

from providers.base import Pattern, ProviderBase
from providers.errors import AmountError, SettlementFormatError
from providers.models import EXPONENT, SettlementLine, first_error, to_minor

NAME = "camt053"
_NS = re.compile(r"^urn:iso:std:iso:20022:tech:xsd:camt\.053\.001\.[0-9]{2}$")
_FEED = 1 << 20  # bytes fed to the parser at a time, at most
_BILL = re.compile(r"\bPS[0-9]{8,23}\b")
_MD5 = re.compile(r"\b[0-9a-fA-F]{32}\b")
_CAMBODIA = timezone(timedelta(hours=7))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ET.Element | None, *path: str) -> ET.Element | None:
    for name in path:
        if el is None:
            return None
        el = next((c for c in el if _local(c.tag) == name), None)
    return el


def _children(el: ET.Element | None, name: str) -> list[ET.Element]:
    return [] if el is None else [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element | None, *path: str) -> str | None:
    found = _child(el, *path)
    if found is None or found.text is None:
        return None
    return found.text.strip() or None


class Camt053Provider(ProviderBase):
    """Reads camt.053 statements; has no callbacks and nothing to poll."""

    name = NAME
    pattern: Pattern = "signed_push"
    captures_payments = False

    def parse_settlement(self, data: bytes) -> Iterator[SettlementLine]:
        """The credit transactions of a camt.053 statement, in document order (see the module docstring)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SettlementFormatError(1, "settlement data must be bytes", provider=NAME)
        data = bytes(data)
        _check_utf8(data)  # so that the byte search below sees what the parser will read
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            raise SettlementFormatError(_line_of(data, data.find(b"<!")), "a document type declaration is not "
                                        "allowed in a camt.053 statement", provider=NAME)
        yield from _Reader(data).lines()

    async def aclose(self) -> None:
        return None


_DECLARED_ENCODING = re.compile(rb'\A(?:\xef\xbb\xbf)?\s*<\?xml\s[^>]*?\bencoding\s*=\s*["\']([^"\']*)["\']')
_UTF8_NAMES = {"utf-8", "utf8", "us-ascii", "ascii"}
_CHECK_CHUNK = 1 << 20


def _check_utf8(data: bytes) -> None:
    """Refuse a statement that is not UTF-8 (ISO 20022's encoding), or says it is in another.

    The parser reads whatever encoding a document declares or its first bytes show; in UTF-16 a document type
    declaration, and the entities it defines, are not the bytes ``<!DOCTYPE`` (found by a security review: a
    3 KB UTF-16 file expanded to a million characters, and a 4 MB one held an instance for five seconds).
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        raise SettlementFormatError(1, "the file is UTF-16 or UTF-32 (by its byte order mark); camt.053 "
                                       "statements are read as UTF-8: convert it to UTF-8", provider=NAME)
    decoder, start = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        for at in range(0, len(data), _CHECK_CHUNK):  # in slices: no second copy of a large file at once
            start = at - len(decoder.getstate()[0])  # where the bytes it decodes now begin (a split character)
            decoder.decode(data[at:at + _CHECK_CHUNK], final=at + _CHECK_CHUNK >= len(data))
    except UnicodeDecodeError as exc:
        bad = start + exc.start
        raise SettlementFormatError(_line_of(data, bad), f"byte {bad + 1} is not UTF-8 text; camt.053 statements "
                                    "are read as UTF-8: convert the file to UTF-8", provider=NAME) from None
    if (nul := data.find(b"\x00")) >= 0:
        raise SettlementFormatError(_line_of(data, nul), "a NUL byte (a UTF-16 file?); camt.053 statements are "
                                    "read as UTF-8: convert the file to UTF-8", provider=NAME)
    declared = _DECLARED_ENCODING.match(data)
    name = declared.group(1).decode("ascii", "replace") if declared else None
    if name is not None and name.lower() not in _UTF8_NAMES:
        raise SettlementFormatError(1, f"the XML declaration says encoding={name!r}; camt.053 statements are read "
                                       "as UTF-8: convert the file to UTF-8 and declare encoding=\"UTF-8\"",
                                    provider=NAME)


def _line_of(data: bytes, offset: int) -> int:
    """The physical line of ``offset``, with line ends as the reader splits lines: LF, CRLF or CR alone."""
    end = max(offset, 0)
    return data.count(b"\n", 0, end) + data.count(b"\r", 0, end) - data.count(b"\r\n", 0, end) + 1


class _Reader:
    """Streams the document line by line through a pull parser, remembering where each entry starts."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._starts: dict[int, int] = {}  # id(element) -> physical line of its start tag
        self._root_checked = False
        self._last = 0  # the line number of the last line yielded

    def lines(self) -> Iterator[SettlementLine]:
        line_no = 0
        for line_no, raw in enumerate(self._data.splitlines(keepends=True), start=1):
            # A file without line breaks is one physical line: fed a piece at a time, so that its entries are
            # read and cleared as they come rather than all parsed before the first is read.
            for at in range(0, len(raw), _FEED) if len(raw) > _FEED else (0,):
                try:
                    self._parser.feed(raw[at:at + _FEED])
                    events = list(self._parser.read_events())
                except ET.ParseError as exc:
                    raise SettlementFormatError(exc.position[0] or line_no, f"not well-formed XML: {exc}",
                                                provider=NAME) from None
                yield from self._handle(events, line_no)
        try:
            self._parser.close()
            events = list(self._parser.read_events())
        except ET.ParseError as exc:
            raise SettlementFormatError(exc.position[0] or max(line_no, 1), f"not well-formed XML: {exc}",
                                        provider=NAME) from None
        yield from self._handle(events, line_no)
        if not self._root_checked:
            raise SettlementFormatError(1, "empty file; expected a camt.053 Document", provider=NAME)

    def _handle(self, events: list[tuple[str, Any]], line_no: int) -> Iterator[SettlementLine]:
        for event, el in events:
            name = _local(el.tag)
            if event == "start":
                if not self._root_checked:
                    self._check_root(el, line_no)
                if name in ("Ntry", "TxDtls"):
                    self._starts[id(el)] = line_no
                continue
            if name == "Ntry":
                yield from self._entry(el)
                self._starts = {}
                el.clear()  # a statement of a million entries is never held whole

    def _check_root(self, el: ET.Element, line_no: int) -> None:
        self._root_checked = True
        ns = el.tag[1:].split("}", 1)[0] if el.tag.startswith("{") else ""
        if _local(el.tag) != "Document" or not _NS.match(ns):
            raise SettlementFormatError(line_no, "not a camt.053 statement: the root must be a Document in a "
                                        "urn:iso:std:iso:20022:tech:xsd:camt.053.001.xx namespace", provider=NAME)

    def _entry(self, ntry: ET.Element) -> Iterator[SettlementLine]:
        at = self._starts.get(id(ntry), 1)
        side = _text(ntry, "CdtDbtInd")
        if side not in ("CRDT", "DBIT"):
            raise SettlementFormatError(at, "Ntry needs CdtDbtInd CRDT or DBIT", provider=NAME)
        status = _text(ntry, "Sts", "Cd") or _text(ntry, "Sts")
        if side != "CRDT" or status != "BOOK" or (_text(ntry, "RvslInd") or "").lower() == "true":
            return
        txs = [tx for d in _children(ntry, "NtryDtls") for tx in _children(d, "TxDtls")]
        single = len(txs) <= 1
        for k, tx in enumerate(txs or [None], start=1):
            line = self._starts.get(id(tx), at) if tx is not None else at
            # Each line needs a number of its own (the import keys lines by it): a transaction that starts on the
            # physical line of the one before (several on one line, as in a file without line breaks) takes the
            # next number up. Found by a review: such a file failed its import with a database error.
            # Errors still name the physical line (found by review: a bumped number pointed past the fault).
            key = max(line, self._last + 1)
            self._last = key
            yield self._line(ntry, tx, line, key, single, k)

    def _line(self, ntry: ET.Element, tx: ET.Element | None, line: int, key: int, single: bool,
              k: int) -> SettlementLine:
        amt = _child(tx, "Amt") if tx is not None else None
        if amt is None and tx is not None:
            amt = _child(tx, "AmtDtls", "TxAmt", "Amt")
        if amt is None and single:
            amt = _child(ntry, "Amt")
        if amt is None:
            raise SettlementFormatError(line, "no amount: a transaction of a batch entry needs TxDtls/Amt",
                                        provider=NAME)
        currency = (amt.get("Ccy") or "").strip()
        if currency not in EXPONENT:
            raise SettlementFormatError(line, f"currency {currency!r} is not KHR or USD", provider=NAME)
        try:
            amount = to_minor(currency, (amt.text or "").strip())
            fee = self._fee(ntry, tx, currency, single, line)
        except AmountError as exc:
            raise SettlementFormatError(line, exc.detail, provider=NAME) from None
        refs = _child(tx, "Refs") if tx is not None else None
        e2e = _text(refs, "EndToEndId")
        if e2e == "NOTPROVIDED":
            e2e = None
        entry_ref = _text(ntry, "AcctSvcrRef") if single else None
        own_id = e2e or _text(refs, "TxId")
        tx_id = own_id or _text(refs, "AcctSvcrRef") or entry_ref
        if tx_id is None and (named := _text(ntry, "AcctSvcrRef") or _text(ntry, "NtryRef")) is not None:
            # The entry's reference names the entry, not one of its transactions: a batch entry's k-th is
            # "{ref}/{k}". Before, every such line of a batch took the same id, and of those that matched no
            # payment all but the first were raised as duplicate_in_settlement, which treasury may write off as a
            # listing error, though each was money that arrived (found by a review of the docs). The bank's own
            # reference first, as for an entry of one transaction: a NtryRef may only number a statement's
            # entries, and another day's would then name this one's (found by review).
            tx_id = named if single else f"{named}/{k}"
        rmt = _child(tx, "RmtInf") if tx is not None else None
        ustrd = " ".join(t.text.strip() for t in _children(rmt, "Ustrd") if t.text)
        bill = _text(rmt, "Strd", "CdtrRefInf", "Ref")
        if bill is None and (m := _BILL.search(ustrd)):
            bill = m.group(0)
        md5 = m.group(0).lower() if (m := _MD5.search(ustrd)) else None
        try:
            return SettlementLine(
                line_no=key, transaction_id=tx_id, md5=md5, bill_number=bill, amount=amount,
                currency=currency,  # type: ignore[arg-type]
                paid_at=self._paid_at(ntry, tx, line), fee=fee,
                reference=_text(refs, "AcctSvcrRef") or entry_ref,
                id_is_reference=own_id is None and tx_id is not None)
        except ValidationError as exc:
            raise SettlementFormatError(line, first_error(exc), provider=NAME) from None

    def _fee(self, ntry: ET.Element, tx: ET.Element | None, currency: str, single: bool, line: int) -> int:
        holders = [_child(tx, "Chrgs")] if tx is not None else []
        if single:
            holders.append(_child(ntry, "Chrgs"))
        total = 0
        for chrgs in holders:
            if chrgs is None:
                continue
            amounts = [_child(chrgs, "TtlChrgsAndTaxAmt")]
            if amounts[0] is None:
                amounts = [_child(r, "Amt") for r in _children(chrgs, "Rcrd")]
            for a in amounts:
                if a is None:
                    continue
                if (a.get("Ccy") or "").strip() != currency:
                    raise SettlementFormatError(line, f"charges in {a.get('Ccy')!r}, not the line's {currency}",
                                                provider=NAME)
                total += to_minor(currency, (a.text or "").strip())
            break  # the transaction's own charges win over the entry's
        return total

    def _paid_at(self, ntry: ET.Element, tx: ET.Element | None, line: int) -> datetime | None:
        text = (_text(tx, "RltdDts", "AccptncDtTm") if tx is not None else None) \
            or _text(ntry, "BookgDt", "DtTm") or _text(ntry, "ValDt", "DtTm")
        if text is None:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise SettlementFormatError(line, f"date-time {text!r} is not ISO 8601", provider=NAME) from None
        return value if value.tzinfo is not None else value.replace(tzinfo=_CAMBODIA)


def write_statement(lines: list[SettlementLine], *, version: str = "08", account: str = "KH00NBC0001") -> bytes:
    """A minimal camt.053 statement crediting each line (one ``Ntry`` with one ``TxDtls`` each): for tests."""
    from providers.models import from_minor
    from xml.sax.saxutils import escape

    ns = f"urn:iso:std:iso:20022:tech:xsd:camt.053.001.{version}"
    out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<Document xmlns="{ns}">\n<BkToCstmrStmt>\n'
           f"<GrpHdr><MsgId>STMT</MsgId><CreDtTm>2025-06-02T08:00:00+07:00</CreDtTm></GrpHdr>\n"
           f"<Stmt><Id>S1</Id><Acct><Id><Othr><Id>{escape(account)}</Id></Othr></Id></Acct>\n"]
    for i, ln in enumerate(lines, start=1):
        amount = from_minor(ln.currency, ln.amount)
        paid = ln.paid_at.isoformat() if ln.paid_at else None
        ustrd = " ".join(x for x in (ln.bill_number, ln.md5) if x)
        fee = (f'<Chrgs><TtlChrgsAndTaxAmt Ccy="{ln.currency}">{from_minor(ln.currency, ln.fee)}'
               f"</TtlChrgsAndTaxAmt></Chrgs>") if ln.fee else ""
        out.append(
            f'<Ntry>\n<Amt Ccy="{ln.currency}">{amount}</Amt><CdtDbtInd>CRDT</CdtDbtInd>'
            f"<Sts><Cd>BOOK</Cd></Sts>" + (f"<BookgDt><DtTm>{paid}</DtTm></BookgDt>" if paid else "")
            + f"<AcctSvcrRef>BANK{i:09d}</AcctSvcrRef>\n<NtryDtls>\n<TxDtls>"
            f"<Refs><AcctSvcrRef>BANK{i:09d}</AcctSvcrRef>"
            + (f"<EndToEndId>{escape(ln.transaction_id)}</EndToEndId>" if ln.transaction_id else "")
            + f"</Refs>{fee}" + (f"<RmtInf><Ustrd>{escape(ustrd)}</Ustrd></RmtInf>" if ustrd else "")
            + "</TxDtls>\n</NtryDtls>\n</Ntry>\n")
    out.append("</Stmt>\n</BkToCstmrStmt>\n</Document>\n")
    return "".join(out).encode()


def create(config: Mapping[str, Any]) -> Camt053Provider:
    """Entry point ``camt053``: takes no configuration."""
    return Camt053Provider()

