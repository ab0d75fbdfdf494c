"""A fake Bakong open API (NBC), answering as its documentation describes, errors and all.

- ``Authorization: Bearer <token>``: no header or not Bearer → HTTP 401; a wrong token → HTTP 200 with
  ``responseCode 1, errorCode 6`` (as Bakong does).
- ``POST /v1/check_transaction_by_md5_list``: a bare JSON array of ≤ 50 md5 strings; more, or not an
  array of strings → HTTP 400 with ``responseCode 1``. Each md5 answers ``SUCCESS`` (with the payment),
  ``STATIC_QR`` or ``NOT_FOUND``.
- ``POST /v1/check_transaction_by_md5``: ``{"md5"}`` → the payment, or ``responseCode 1, errorCode 1``.
- ``POST /v1/renew_token``: ``{"email"}`` → ``data.token``, a new token, when the e-mail is the one the
  token was issued to (``email``); the old token is refused from then on (the strictest reading). Another
  e-mail → ``responseCode 1``. No bearer is needed.
- Scripted answers (``fail_next``) come first: 429 with ``Retry-After``, 500, garbage.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from aiohttp import web

from tests.fakes import FakeServer

MAX_MD5 = 50
_NUM = "__rawnumber__"


def dumps(doc: Any) -> bytes:
    """JSON with amounts written as bare numbers exactly as given (``"__rawnumber__12.50"`` → ``12.50``)."""
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace(f'"{_NUM}', "").replace(f'{_NUM}"', "").encode() if _NUM in text else text.encode()


def _raw_number(value: int | str) -> Any:
    return value if isinstance(value, int) else f"{_NUM}{value}{_NUM}"


def envelope(data: Any, code: int = 0, error_code: int | None = None,
             message: str = "Getting transaction successfully.") -> dict:
    """Bakong's response envelope."""
    return {"responseCode": code, "responseMessage": message, "errorCode": error_code, "data": data}


class FakeBakong(FakeServer):
    """Bakong's transaction-check API on a local port. ``base_url`` for the plugin is ``url + "/v1"``."""

    def __init__(self, token: str = "test-token", email: str = "ops@agency.gov.kh") -> None:
        super().__init__()
        self.token = token
        self.email = email
        self.renewals = 0
        self.payments: dict[str, dict[str, Any]] = {}
        self.static_qr: set[str] = set()

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def add_payment(self, md5: str, *, amount: int | str, currency: str, to_account: str = "fees@devb",
                    from_account: str = "citizen@aba", tx_hash: str | None = None, created_ms: int | None = None,
                    acknowledged_ms: int | None | Literal["created+1s"] = "created+1s", description: str = "",
                    external_ref: str = "100FT3333") -> dict[str, Any]:
        """Record a payment on the code ``md5``; ``amount`` is major units (``12.5``-style text or an int).

        Made now unless ``created_ms`` says when (the service does not believe a payment made before its
        code was issued), and acknowledged a second later unless ``acknowledged_ms`` says otherwise."""
        if created_ms is None:
            created_ms = int(time.time() * 1000)
        if acknowledged_ms == "created+1s":
            acknowledged_ms = created_ms + 1000
        data = {"hash": tx_hash or (md5 * 2), "fromAccountId": from_account, "toAccountId": to_account,
                "currency": currency, "amount": _raw_number(amount), "description": description,
                "createdDateMs": created_ms, "acknowledgedDateMs": acknowledged_ms, "externalRef": external_ref}
        self.payments[md5] = data
        return data

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/check_transaction_by_md5_list", self._md5_list)
        app.router.add_post("/v1/check_transaction_by_md5", self._md5_one)
        app.router.add_post("/v1/renew_token", self._renew)
        return app

    async def _renew(self, request: web.Request) -> web.Response:
        entry = await self._log(request)
        scripted = self._scripted()
        if scripted is not None:
            return scripted
        try:
            entry.json = json.loads(entry.body)
        except ValueError:
            return self._answer(envelope(None, 1, 5, "Request body is not valid JSON"), status=400)
        if not isinstance(entry.json, dict) or entry.json.get("email") != self.email:
            return self._answer(envelope(None, 1, 10, "This email is not registered"))
        self.renewals += 1
        self.token = f"renewed-{self.renewals}"
        return self._answer(envelope({"token": self.token}, message="Token has been issued"))

    def _answer(self, doc: dict, status: int = 200) -> web.Response:
        return web.Response(status=status, body=dumps(doc), content_type="application/json")

    async def _auth(self, request: web.Request) -> tuple[Any, web.Response | None]:
        entry = await self._log(request)
        scripted = self._scripted()
        if scripted is not None:
            return None, scripted
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None, self._answer(envelope(None, 1, 6, "Unauthorized"), status=401)
        if auth[len("Bearer "):] != self.token:
            return None, self._answer(envelope(None, 1, 6, "Unauthorized, not yet requested for token or code invalid"))
        try:
            entry.json = json.loads(entry.body)
        except ValueError:
            return None, self._answer(envelope(None, 1, 5, "Request body is not valid JSON"), status=400)
        return entry.json, None

    async def _md5_list(self, request: web.Request) -> web.Response:
        body, refused = await self._auth(request)
        if refused is not None:
            return refused
        if not isinstance(body, list) or not all(isinstance(m, str) for m in body):
            return self._answer(envelope(None, 1, 5, "Request body must be an array of md5 strings"), status=400)
        if len(body) > MAX_MD5:
            return self._answer(envelope(None, 1, 5, f"md5 list must not exceed {MAX_MD5} items"), status=400)
        items = []
        for md5 in body:
            if md5 in self.payments:
                items.append({"md5": md5, "status": "SUCCESS", "data": self.payments[md5]})
            elif md5 in self.static_qr:
                items.append({"md5": md5, "status": "STATIC_QR", "data": None})
            else:
                items.append({"md5": md5, "status": "NOT_FOUND", "data": None})
        return self._answer(envelope(items))

    async def _md5_one(self, request: web.Request) -> web.Response:
        body, refused = await self._auth(request)
        if refused is not None:
            return refused
        md5 = body.get("md5") if isinstance(body, dict) else None
        if md5 in self.payments:
            return self._answer(envelope(self.payments[md5]))
        return self._answer(envelope(None, 1, 1, "Transaction could not be found. Please check and try again."))

    def batch_sizes(self) -> list[int]:
        """How many md5 each logged list call asked about."""
        return [len(r.json) for r in self.requests if r.path.endswith("_md5_list") and isinstance(r.json, list)]
