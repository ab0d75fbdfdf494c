"""A fake ABA PayWay ``check-transaction-2``, answering as PayWay's documentation describes.

- ``POST /api/payment-gateway/v1/payments/check-transaction-2`` with JSON ``{req_time, merchant_id,
  tran_id, hash}``; ``hash`` must be ``base64(HMAC-SHA512(req_time + merchant_id + tran_id, api_key))``
  (computed here independently of the plugin), else HTTP 403 ``{"status": {"code": "1", "message":
  "Wrong Hash."}}``. A wrong merchant id fails the hash the same way.
- Known ``tran_id`` → HTTP 200 ``{"data": {payment_status_code, total_amount, original_amount,
  refund_amount, discount_amount, payment_amount, payment_currency, apv, payment_status,
  transaction_date}, "status": {"code": "00", "message": "Success!", "tran_id"}}``; unknown → HTTP 200
  ``{"status": {"code": "6", "message": "tran_id not found", "tran_id"}}``.
- Scripted answers (``fail_next``) come first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from tests.fakes import FakeServer
from tests.fakes.bakong import _raw_number, dumps

PHNOM_PENH = timezone(timedelta(hours=7))

PATH = "/api/payment-gateway/v1/payments/check-transaction-2"
STATUS_CODES = {"APPROVED": 0, "PRE-AUTH": 0, "PENDING": 2, "DECLINED": 3, "REFUNDED": 4, "CANCELLED": 7}


class FakePayWay(FakeServer):
    """PayWay's transaction check on a local port; the plugin's ``base_url`` is ``url``."""

    def __init__(self, merchant_id: str = "ec000002", api_key: str = "test-api-key") -> None:
        super().__init__()
        self.merchant_id = merchant_id
        self.api_key = api_key
        self.transactions: dict[str, dict[str, Any]] = {}

    def add_transaction(self, tran_id: str, *, status: str = "APPROVED", amount: int | str = "12.50",
                        currency: str = "USD", transaction_date: str | None = None,
                        apv: str = "619195") -> dict[str, Any]:
        """Record a transaction; ``amount`` is major units as PayWay writes it (a JSON number).

        Made now (Phnom Penh time, as PayWay writes it) unless ``transaction_date`` says when."""
        if transaction_date is None:
            transaction_date = datetime.now(PHNOM_PENH).strftime("%Y-%m-%d %H:%M:%S")
        num = _raw_number(amount)
        data = {"payment_status_code": STATUS_CODES[status], "total_amount": num, "original_amount": num,
                "refund_amount": 0, "discount_amount": 0, "payment_amount": num, "payment_currency": currency,
                "apv": apv if status == "APPROVED" else "", "payment_status": status,
                "transaction_date": transaction_date}
        self.transactions[tran_id] = data
        return data

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(PATH, self._check)
        return app

    def expected_hash(self, req_time: str, tran_id: str) -> str:
        mac = hmac.new(self.api_key.encode(), f"{req_time}{self.merchant_id}{tran_id}".encode(), hashlib.sha512)
        return base64.b64encode(mac.digest()).decode()

    async def _check(self, request: web.Request) -> web.Response:
        entry = await self._log(request)
        scripted = self._scripted()
        if scripted is not None:
            return scripted
        try:
            body = entry.json = json.loads(entry.body)
        except ValueError:
            body = None
        fields = ("req_time", "merchant_id", "tran_id", "hash")
        if not isinstance(body, dict) or not all(isinstance(body.get(f), str) for f in fields):
            return self._answer({"status": {"code": "4", "message": "Parameter validation required"}}, 400)
        tran_id = body["tran_id"]
        if not re.fullmatch(r"[0-9]{14}", body["req_time"]):
            return self._answer({"status": {"code": "4", "message": "Invalid req_time", "tran_id": tran_id}}, 400)
        good = hmac.compare_digest(self.expected_hash(body["req_time"], tran_id), body["hash"])
        if not good or body["merchant_id"] != self.merchant_id:
            return self._answer({"status": {"code": "1", "message": "Wrong Hash.", "tran_id": tran_id}}, 403)
        if tran_id not in self.transactions:
            return self._answer({"status": {"code": "6", "message": "tran_id not found", "tran_id": tran_id}})
        return self._answer({"data": self.transactions[tran_id],
                             "status": {"code": "00", "message": "Success!", "tran_id": tran_id}})

    def _answer(self, doc: dict, status: int = 200) -> web.Response:
        return web.Response(status=status, body=dumps(doc), content_type="application/json")
