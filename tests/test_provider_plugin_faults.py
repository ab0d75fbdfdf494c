"""A provider plugin that breaks its contract (found by a bank integrator's walk-through): what it returns is
checked before anything is captured, a defect of its own never loses the callback, and the callback is kept
and tried again with backoff, so the fixed plugin processes it."""

from __future__ import annotations

import asyncpg
import prometheus_client
import pytest

from paysvc import inbox
from paysvc.web import POOL, PROVIDERS
from providers import PaymentNotice
from providers.sandbox import SandboxConfig, SandboxProvider
from tests.conftest import TEST_SANDBOX_SECRET
from tests.payments_helpers import new_invoice, sandbox_body, sandbox_headers


class Faulty(SandboxProvider):
    """Sandbox's signature and body, under another name, broken as ``mode`` says."""

    name = "faulty"

    def __init__(self) -> None:
        super().__init__(SandboxConfig.model_validate({"secrets": [TEST_SANDBOX_SECRET]}))
        self.mode = "ok"

    def verify_callback(self, headers, body, *, now) -> None:
        super().verify_callback(headers, body, now=now)
        if self.mode == "verify_raises":
            raise KeyError("x-bank-header")

    def parse_callback(self, headers, body):
        [n] = super().parse_callback(headers, body)              # a notice of provider "sandbox"
        if self.mode == "other_provider":
            return [n]
        own = n.model_copy(update={"provider": self.name})
        if self.mode == "not_a_list":
            return {"notice": own}
        if self.mode == "invalid":
            return [PaymentNotice.model_construct(**{**own.model_dump(), "amount": -5})]
        if self.mode == "unconfirmed":
            return [own.model_copy(update={"confirmed": False})]
        if self.mode == "parse_raises":
            raise TypeError("'NoneType' object is not subscriptable")
        return [own]


def _faults(provider: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value("paysvc_provider_plugin_faults_total",
                                                        {"provider": provider}) or 0


@pytest.mark.parametrize("mode, says", [
    ("other_provider", "returned a notice for provider 'sandbox'"),
    ("not_a_list", "returned dict, not a list of PaymentNotice"),
    ("invalid", "returned a notice that is not valid: amount"),
    ("unconfirmed", "returned an unconfirmed notice"),
    ("verify_raises", "the faulty plugin failed: KeyError"),
    ("parse_raises", "the faulty plugin failed: TypeError"),
])
async def test_a_plugin_breaking_its_contract_books_nothing_and_its_callback_waits_for_the_fix(
        api, portal, invoice_body, mode, says):
    plugin = Faulty()
    plugin.mode = mode
    api.client.app[PROVIDERS]["faulty"] = plugin
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    before = _faults("faulty")
    r = await api.client.post("/v1/providers/faulty/callbacks", data=body, headers=sandbox_headers(body))
    assert r.status == 202, await r.text()                      # stored: the bank need not send it again
    inbox_id = (await r.json())["inbox_id"]
    # counted once, and once more for verify_callback's failure while the replay key was computed
    assert _faults("faulty") == before + (2 if mode == "verify_raises" else 1)
    conn = await asyncpg.connect(api.dsn)
    try:
        row = await conn.fetchrow("SELECT state, reason, next_attempt_at > now() + interval '0.5 s' AS later "
                                  "FROM provider_inbox WHERE id = $1", inbox_id)
        assert row["state"] == "received" and row["later"], dict(row)
        assert row["reason"].startswith("plugin_fault: ") and says in row["reason"], row["reason"]
        assert await conn.fetchval("SELECT count(*) FROM payments") == 0
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 0

        # The plugin is fixed: the worker captures the callback kept for it, under the plugin's own name.
        plugin.mode = "ok"
        await conn.execute("UPDATE provider_inbox SET next_attempt_at = now() - interval '1 s' WHERE id = $1",
                           inbox_id)
        assert await inbox.work(api.client.app[POOL], api.client.app[PROVIDERS]) == "processed 1 of 1 inbox rows"
        assert await conn.fetchval("SELECT state FROM provider_inbox WHERE id = $1", inbox_id) == "processed"
        assert await conn.fetchval("SELECT provider FROM payments") == "faulty"
    finally:
        await conn.close()


async def test_a_failing_replay_key_does_not_keep_the_callback_from_being_stored(api, portal, invoice_body):
    class NoKey(Faulty):
        def replay_key(self, headers, body):
            raise RuntimeError("plugin bug")

    api.client.app[PROVIDERS]["faulty"] = NoKey()
    inv = await new_invoice(api, portal, invoice_body)
    body = sandbox_body(inv)
    before = _faults("faulty")
    r = await api.client.post("/v1/providers/faulty/callbacks", data=body, headers=sandbox_headers(body))
    assert r.status == 200 and (await r.json())["status"] == "processed", await r.text()
    assert _faults("faulty") == before + 1                     # replay protection off for it: counted, not silent


async def test_a_pull_plugin_reporting_for_another_provider_fails_its_pass_and_its_codes_stay_asked(
        db_dsn, invoice_body):
    from datetime import timedelta

    from paysvc.poller import PollPolicy, poll_once
    from providers import PollResult
    from tests.conftest import running_api
    from tests.fakes.bakong import FakeBakong

    async with FakeBakong(token="bk-token") as fake:
        async with running_api(db_dsn, providers="sandbox,bakong", bakong_token="bk-token",
                               bakong_base_url=fake.base_url) as api:
            h = await api.portal("MOI")
            inv = await (await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=h)).json()
            fake.add_payment(inv["khqr"]["md5"], amount="50000", currency="KHR", to_account="moi@nbcq")
            real = api.client.app[PROVIDERS]["bakong"]
            original = real.poll

            async def as_sandbox(pending):
                result = await original(pending)
                return PollResult(notices=[n.model_copy(update={"provider": "sandbox"}) for n in result.notices])

            real.poll = as_sandbox
            policy = PollPolicy(min_interval=timedelta(0))
            with pytest.raises(inbox.PluginFault, match="returned a notice for provider 'sandbox'"):
                await poll_once(api.client.app[POOL], real, policy)
            conn = await asyncpg.connect(api.dsn)
            try:
                assert await conn.fetchval("SELECT count(*) FROM payments") == 0
                real.poll = original                          # fixed: the code was not given up, it is asked again
                assert await poll_once(api.client.app[POOL], real, policy) == (1, 1)
                assert await conn.fetchval("SELECT provider FROM payments") == "bakong"
            finally:
                await conn.close()
