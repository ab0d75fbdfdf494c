"""KHQR: EMVCo merchant-presented QR with the National Bank of Cambodia's rules (KHQR SDK and content guideline).

Pure: stdlib and pydantic only. ``encode`` refuses to write a code a bank app would refuse, and
``decode`` checks a string the way a bank app does before it lets anyone pay. Both raise
``KhqrError`` whose ``code`` is one of:

``empty_payload``, ``bad_tag``, ``bad_length``, ``empty_field``, ``unknown_tag``, ``tag_order``,
``missing_field``, ``field_too_long``, ``bad_encoding``, ``bad_crc``, ``crc_mismatch``,
``bad_format_indicator``, ``bad_point_of_initiation``, ``bad_account_id``, ``account_conflict``,
``upi_with_usd``, ``bad_mcc``, ``bad_currency``, ``bad_amount``, ``static_with_amount``,
``bad_country``, ``bad_timestamp``, ``expiry_before_creation``, ``expired``, ``bad_data``.

Lengths count characters (code points), never UTF-8 bytes: tag 64 carries Khmer text.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError


class KhqrError(ValueError):
    """A KHQR string or KhqrData breaks a rule of NBC's KHQR specification.

    ``code`` is stable for machines, ``reason`` says which rule in a sentence, ``tag`` names the
    field ("59", "62.01") when one is at fault.
    """

    code: str
    reason: str
    tag: str | None

    def __init__(self, code: str, reason: str, tag: str | None = None) -> None:
        # All three go to args so the error survives pickling (e.g. across process pools).
        super().__init__(code, reason, tag)
        self.code = code
        self.reason = reason
        self.tag = tag

    def __str__(self) -> str:
        where = f" (tag {self.tag})" if self.tag else ""
        return f"{self.code}{where}: {self.reason}"


class KhqrData(BaseModel):
    """Everything a KHQR string carries. Money is ``amount`` in minor units of ``currency``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    point_of_initiation: Literal["11", "12"] = "12"
    bakong_account_id: str
    merchant_id: str | None = None
    acquiring_bank: str | None = None
    account_information: str | None = None
    upi_account: str | None = None
    merchant_category_code: str = "5999"
    currency: Literal["KHR", "USD"]
    amount: int | None = None
    country_code: str = "KH"
    merchant_name: str
    merchant_city: str = "Phnom Penh"
    bill_number: str | None = None
    mobile_number: str | None = None
    store_label: str | None = None
    terminal_label: str | None = None
    purpose_of_transaction: str | None = None
    language_preference: str | None = None
    merchant_name_alternate: str | None = None
    merchant_city_alternate: str | None = None
    created_at_ms: int | None = None
    expires_at_ms: int | None = None


_CURRENCY_NUMERIC = {"KHR": "116", "USD": "840"}
_NUMERIC_CURRENCY = {numeric: alpha for alpha, numeric in _CURRENCY_NUMERIC.items()}
_MAX_AMOUNT_CHARS = 13
_MAX_VALUE_CHARS = 99  # LEN is two decimal digits

# Position in this tuple is the required order; 63 comes last so nothing may follow the CRC.
_TOP_ORDER = ("00", "01", "15", "29", "30", "52", "53", "54", "58", "59", "60", "62", "64", "99", "63")
_SUB_ORDER = {
    "29": ("00", "01", "02"),
    "30": ("00", "01", "02"),
    "62": ("01", "02", "03", "07", "08"),
    "64": ("00", "01", "02"),
    "99": ("00", "01"),
}
_ADDITIONAL_DATA = (
    ("01", "bill_number"),
    ("02", "mobile_number"),
    ("03", "store_label"),
    ("07", "terminal_label"),
    ("08", "purpose_of_transaction"),
)
# ASCII only: str.isdigit() and re's \d also accept Khmer and Arabic-Indic digits, which int() parses.
_DIGITS = frozenset("0123456789")
_KHR_AMOUNT = re.compile(r"[0-9]+")
_USD_AMOUNT = re.compile(r"([0-9]+)(?:\.([0-9]{1,2}))?")
_CRC_TEXT = re.compile(r"[0-9A-F]{4}")


def crc16(data: str) -> str:
    """CRC-16/CCITT-FALSE of the UTF-8 bytes of ``data`` as 4 upper-case hex digits ("123456789" -> "29B1")."""
    return format(binascii.crc_hqx(data.encode("utf-8"), 0xFFFF), "04X")


def md5(payload: str) -> str:
    """The hex md5 of the whole KHQR string: the key Bakong looks a payment up by."""
    return hashlib.md5(payload.encode("utf-8")).hexdigest()


def format_amount(currency: str, minor: int) -> str:
    """Tag 54 text for ``minor`` units: KHR 25000 -> "25000"; USD 1250 -> "12.50", 10000 -> "100", 5 -> "0.05"."""
    _currency_numeric(currency)
    if isinstance(minor, bool) or not isinstance(minor, int) or minor < 0:
        raise KhqrError("bad_amount", f"an amount is a non-negative integer of minor units, not {minor!r}", "54")
    if currency == "KHR":
        return str(minor)
    dollars, cents = divmod(minor, 100)
    return str(dollars) if cents == 0 else f"{dollars}.{cents:02d}"


def parse_amount(currency: str, text: str) -> int:
    """Minor units from tag 54 text: KHR a whole number of riel; USD dollars with at most 2 decimals.

    "12.5" and "12.50" are both 1250 cents, "100" is 10000. Longer than 13 characters is refused.
    """
    _currency_numeric(currency)
    if len(text) > _MAX_AMOUNT_CHARS:
        raise KhqrError("field_too_long", f"the amount {text!r} is longer than {_MAX_AMOUNT_CHARS} characters", "54")
    if currency == "KHR":
        if not _KHR_AMOUNT.fullmatch(text):
            raise KhqrError("bad_amount", f"a KHR amount is a whole number of riel, not {text!r}", "54")
        return int(text)
    match = _USD_AMOUNT.fullmatch(text)
    if not match:
        raise KhqrError("bad_amount", f"a USD amount has digits and at most 2 decimals, not {text!r}", "54")
    return int(match[1]) * 100 + int((match[2] or "0").ljust(2, "0"))


def encode(data: KhqrData) -> str:
    """The KHQR string for ``data``, ending in "6304" + CRC. Raises KhqrError if any KHQR rule is broken."""
    _validate(data)
    fields = [("00", "01"), ("01", data.point_of_initiation)]
    if data.upi_account is not None:
        fields.append(("15", data.upi_account))
    # Sub 01 is the account information of an individual (29) but the merchant id of a corporate (30).
    tag, sub01 = ("29", data.account_information) if data.merchant_id is None else ("30", data.merchant_id)
    fields.append((tag, _template(tag, [("00", data.bakong_account_id), ("01", sub01), ("02", data.acquiring_bank)])))
    fields += [("52", data.merchant_category_code), ("53", _CURRENCY_NUMERIC[data.currency])]
    if data.amount is not None:
        fields.append(("54", format_amount(data.currency, data.amount)))
    fields += [("58", data.country_code), ("59", data.merchant_name), ("60", data.merchant_city)]
    optional_templates = (
        ("62", [(sub, getattr(data, name)) for sub, name in _ADDITIONAL_DATA]),
        ("64", [("00", data.language_preference), ("01", data.merchant_name_alternate),
                ("02", data.merchant_city_alternate)]),
        ("99", [("00", _ms_text(data.created_at_ms)), ("01", _ms_text(data.expires_at_ms))]),
    )
    for tag, subs in optional_templates:
        if any(value is not None for _, value in subs):
            fields.append((tag, _template(tag, subs)))
    body = "".join(_tlv(tag, value) for tag, value in fields) + "6304"
    return body + crc16(body)


def _utc_text(ms: int) -> str:
    """Milliseconds since the epoch as a person reads a time (UTC, to the second); the number if out of range."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


def decode(payload: str, *, now_ms: int | None = None) -> KhqrData:
    """Parse and check a KHQR string as a bank app would; raise KhqrError naming the broken rule.

    Checks structure (ID + LEN in characters), that 63 is last with a correct upper-case CRC, tag order,
    required tags, every length and format rule, and the dynamic-code rules. Expiry is checked against
    ``now_ms`` only when it is given, so an old string can still be read for audit.
    """
    if not payload:
        raise KhqrError("empty_payload", "the payload is empty")
    try:
        payload.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KhqrError("bad_encoding", f"the payload is not valid Unicode text ({exc.reason})") from None
    fields = _split(payload, None)
    _check_crc(payload, fields)
    top = _ordered(fields, _TOP_ORDER, None)
    for tag in ("00", "01", "52", "53", "58", "59", "60"):
        if tag not in top:
            raise KhqrError("missing_field", f"tag {tag} is required", tag)
    if top["00"] != "01":
        raise KhqrError("bad_format_indicator", f"tag 00 must be '01', not {top['00']!r}", "00")
    if top["01"] not in ("11", "12"):
        raise KhqrError("bad_point_of_initiation", f"tag 01 must be '11' or '12', not {top['01']!r}", "01")
    if "29" in top and "30" in top:
        raise KhqrError("account_conflict", "a code carries tag 29 (individual) or tag 30 (corporate), not both", "30")
    if "29" not in top and "30" not in top:
        raise KhqrError("missing_field", "tag 29 (individual) or tag 30 (corporate) is required", "29")
    account_tag = "30" if "30" in top else "29"
    account = _subfields(top, account_tag)
    if "00" not in account:
        raise KhqrError("missing_field", f"tag {account_tag}.00 (Bakong account id) is required", f"{account_tag}.00")
    if account_tag == "30":
        for sub, what in (("01", "merchant id"), ("02", "acquiring bank")):
            if sub not in account:
                raise KhqrError("missing_field", f"a corporate code (tag 30) needs 30.{sub} ({what})", f"30.{sub}")
    currency = _NUMERIC_CURRENCY.get(top["53"])
    if currency is None:
        raise KhqrError("bad_currency", f"tag 53 must be 116 (KHR) or 840 (USD), not {top['53']!r}", "53")
    additional = _subfields(top, "62")
    language = _subfields(top, "64")
    timestamps = _subfields(top, "99")
    try:
        data = KhqrData(
            point_of_initiation=top["01"],
            bakong_account_id=account["00"],
            merchant_id=account.get("01") if account_tag == "30" else None,
            account_information=account.get("01") if account_tag == "29" else None,
            acquiring_bank=account.get("02"),
            upi_account=top.get("15"),
            merchant_category_code=top["52"],
            currency=currency,
            amount=parse_amount(currency, top["54"]) if "54" in top else None,
            country_code=top["58"],
            merchant_name=top["59"],
            merchant_city=top["60"],
            **{name: additional.get(sub) for sub, name in _ADDITIONAL_DATA},
            language_preference=language.get("00"),
            merchant_name_alternate=language.get("01"),
            merchant_city_alternate=language.get("02"),
            created_at_ms=_ms_value(timestamps.get("00"), "99.00"),
            expires_at_ms=_ms_value(timestamps.get("01"), "99.01"),
        )
    except ValidationError as exc:  # every field is checked above; this is a guard, not a path
        raise KhqrError("bad_data", f"the decoded fields do not form KhqrData: {exc}") from None
    _validate(data)
    if now_ms is not None and data.expires_at_ms is not None and data.expires_at_ms < now_ms:
        raise KhqrError("expired", f"the code expired at {_utc_text(data.expires_at_ms)}, before now "
                                   f"({_utc_text(now_ms)})", "99.01")
    return data


def _validate(data: KhqrData) -> None:
    """Every KHQR rule that KhqrData's types do not already enforce."""
    account_tag = "29" if data.merchant_id is None else "30"
    _text(data.bakong_account_id, f"{account_tag}.00", 32, required=True)
    if "@" not in data.bakong_account_id:
        raise KhqrError(
            "bad_account_id",
            f"a Bakong account id looks like name@bank, {data.bakong_account_id!r} has no '@'",
            f"{account_tag}.00",
        )
    if data.merchant_id is not None:
        _text(data.merchant_id, "30.01", 32, required=True)
        if data.acquiring_bank is None:
            raise KhqrError("missing_field", "a corporate code (tag 30) needs an acquiring bank", "30.02")
        if data.account_information is not None:
            raise KhqrError(
                "account_conflict", "account information is tag 29.01; a corporate code (tag 30) has none", "29.01"
            )
    _text(data.account_information, "29.01", 32)
    _text(data.acquiring_bank, f"{account_tag}.02", 32)
    _text(data.upi_account, "15", _MAX_VALUE_CHARS)
    if data.upi_account is not None and data.currency == "USD":
        raise KhqrError("upi_with_usd", "a UnionPay account (tag 15) is not allowed with USD", "15")
    mcc = data.merchant_category_code
    if len(mcc) != 4 or not set(mcc) <= _DIGITS:
        raise KhqrError("bad_mcc", f"the merchant category code is 4 digits, not {mcc!r}", "52")
    if data.country_code != "KH":
        raise KhqrError("bad_country", f"the country code is 'KH', not {data.country_code!r}", "58")
    _text(data.merchant_name, "59", 25, required=True)
    _text(data.merchant_city, "60", 15, required=True)
    for sub, name in _ADDITIONAL_DATA:
        _text(getattr(data, name), f"62.{sub}", 25)
    # NBC's SDK caps the language preference at 2 characters (an ISO 639-1 code such as "km").
    _text(data.language_preference, "64.00", 2)
    _text(data.merchant_name_alternate, "64.01", 25)
    _text(data.merchant_city_alternate, "64.02", 15)
    if data.language_preference is not None and data.merchant_name_alternate is None:
        raise KhqrError("missing_field", "a language preference (64.00) needs the name in that language", "64.01")
    _check_amount(data)
    _check_timestamps(data)


def _check_amount(data: KhqrData) -> None:
    if data.point_of_initiation == "11":
        if data.amount is not None:
            raise KhqrError("static_with_amount", "a static code (01 = 11) carries no amount", "54")
        return
    if data.amount is None:
        raise KhqrError("missing_field", "a dynamic code (01 = 12) needs an amount", "54")
    if isinstance(data.amount, bool) or data.amount <= 0:
        raise KhqrError("bad_amount", f"a dynamic code's amount must be above zero, not {data.amount}", "54")
    # Checked on the text encode writes too, so whatever decode accepts can be written back.
    text = format_amount(data.currency, data.amount)
    if len(text) > _MAX_AMOUNT_CHARS:
        raise KhqrError("field_too_long", f"the amount {text!r} is longer than {_MAX_AMOUNT_CHARS} characters", "54")


def _check_timestamps(data: KhqrData) -> None:
    created, expires = data.created_at_ms, data.expires_at_ms
    if data.point_of_initiation == "12":
        if created is None and expires is None:
            raise KhqrError("missing_field", "a dynamic code (01 = 12) needs timestamps (tag 99)", "99")
        if created is None:
            raise KhqrError("missing_field", "a dynamic code needs its creation time", "99.00")
        if expires is None:
            raise KhqrError("missing_field", "a dynamic code needs its expiration time", "99.01")
    for ms, tag in ((created, "99.00"), (expires, "99.01")):
        if ms is not None and not 10**12 <= ms < 10**13:
            raise KhqrError("bad_timestamp", f"a timestamp is exactly 13 digits of epoch milliseconds, not {ms}", tag)
    if created is not None and expires is not None and expires < created:
        raise KhqrError("expiry_before_creation", f"expiration {expires} ms is before creation {created} ms", "99.01")


def _text(value: str | None, tag: str, max_chars: int, *, required: bool = False) -> None:
    if value is None and not required:
        return
    if not value:
        raise KhqrError("empty_field", f"tag {tag} must not be empty", tag)
    if len(value) > max_chars:
        raise KhqrError(
            "field_too_long", f"tag {tag} holds at most {max_chars} characters, {value!r} has {len(value)}", tag
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise KhqrError("bad_encoding", f"tag {tag} holds a character UTF-8 cannot encode", tag) from None


def _tlv(tag: str, value: str) -> str:
    return f"{tag}{len(value):02d}{value}"


def _template(tag: str, subs: Iterable[tuple[str, str | None]]) -> str:
    value = "".join(_tlv(sub, text) for sub, text in subs if text is not None)
    if len(value) > _MAX_VALUE_CHARS:
        raise KhqrError(
            "field_too_long",
            f"tag {tag} with its sub-fields is {len(value)} characters; a field holds at most {_MAX_VALUE_CHARS}",
            tag,
        )
    return value


def _ms_text(ms: int | None) -> str | None:
    return None if ms is None else str(ms)


def _ms_value(text: str | None, tag: str) -> int | None:
    if text is None:
        return None
    if len(text) != 13 or not set(text) <= _DIGITS or text[0] == "0":
        raise KhqrError("bad_timestamp", f"a timestamp is exactly 13 digits of epoch milliseconds, not {text!r}", tag)
    return int(text)


def _currency_numeric(currency: str) -> str:
    try:
        return _CURRENCY_NUMERIC[currency]
    except (KeyError, TypeError):
        raise KhqrError("bad_currency", f"the currency is KHR or USD, not {currency!r}", "53") from None


def _split(text: str, parent: str | None) -> list[tuple[str, str]]:
    """ID + LEN + value fields of ``text``; LEN counts characters."""
    fields: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if len(text) - pos < 4:
            raise KhqrError("bad_length", f"{text[pos:]!r} at the end is too short for an ID and a LEN", parent)
        tag, size = text[pos : pos + 2], text[pos + 2 : pos + 4]
        if not set(tag) <= _DIGITS:
            raise KhqrError("bad_tag", f"the ID {tag!r} at position {pos} is not two digits", parent)
        name = tag if parent is None else f"{parent}.{tag}"
        if not set(size) <= _DIGITS:
            raise KhqrError("bad_length", f"the LEN {size!r} of tag {name} is not two decimal digits", name)
        end = pos + 4 + int(size)
        if end == pos + 4:
            raise KhqrError("empty_field", f"tag {name} has LEN 00; a field holds at least one character", name)
        if end > len(text):
            raise KhqrError(
                "bad_length", f"tag {name} declares {int(size)} characters but only {len(text) - pos - 4} follow", name
            )
        fields.append((tag, text[pos + 4 : end]))
        pos = end
    return fields


def _ordered(fields: list[tuple[str, str]], order: tuple[str, ...], parent: str | None) -> dict[str, str]:
    """The fields by ID, refusing IDs KHQR does not define and any out of order or repeated."""
    seen: dict[str, str] = {}
    last, previous = -1, None
    for tag, value in fields:
        name = tag if parent is None else f"{parent}.{tag}"
        if tag not in order:
            raise KhqrError("unknown_tag", f"tag {name} is not a KHQR field", name)
        rank = order.index(tag)
        if rank <= last:
            problem = "appears twice" if tag in seen else f"comes after tag {previous}"
            raise KhqrError("tag_order", f"tag {name} {problem}; the order is {', '.join(order)}", name)
        seen[tag] = value
        last, previous = rank, tag
    return seen


def _subfields(top: dict[str, str], tag: str) -> dict[str, str]:
    if tag not in top:
        return {}
    return _ordered(_split(top[tag], tag), _SUB_ORDER[tag], tag)


def _check_crc(payload: str, fields: list[tuple[str, str]]) -> None:
    if fields[-1][0] != "63":
        if any(tag == "63" for tag, _ in fields):
            raise KhqrError("tag_order", "the CRC (tag 63) must be the last field", "63")
        raise KhqrError("missing_field", "tag 63 (CRC) is required", "63")
    crc = fields[-1][1]
    # 6304 + 4 upper-case hex digits is the only form: a lower-case CRC is a different string, so a different md5.
    if not payload.endswith("6304" + crc) or not _CRC_TEXT.fullmatch(crc):
        raise KhqrError("bad_crc", f"the CRC field is '6304' and 4 upper-case hex digits, not '63..{crc}'", "63")
    expected = crc16(payload[:-4])
    if crc != expected:
        raise KhqrError("crc_mismatch", f"the CRC is {crc} but the content gives {expected}", "63")
