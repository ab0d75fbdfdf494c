"""Public keys, the replay feed, and the reference consumer refusing a tampered message."""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import aio_pika
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from paysvc.app import create_app
from paysvc.settings import SettingsError
from tests.conftest import make_settings, running_api
from tests.test_events_support import SEED_1, SEED_2, Broker, broker, close_relay, make_relay  # noqa: F401


def raw_public(seed_b64: str) -> str:
    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed_b64)).public_key()
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


async def test_keys_lists_every_configured_public_key_and_no_private_one(db_dsn):
    async with running_api(db_dsn, event_signing_keys=f"new:{SEED_2},old:{SEED_1}") as api:
        r = await api.client.get("/v1/keys/events")  # public: no Authorization
        assert r.status == 200
        text = await r.text()
    assert json.loads(text) == {"keys": [
        {"key_id": "new", "algorithm": "Ed25519", "public_key": raw_public(SEED_2), "status": "active"},
        {"key_id": "old", "algorithm": "Ed25519", "public_key": raw_public(SEED_1), "status": "retiring"},
    ]}
    assert SEED_1 not in text and SEED_2 not in text


async def test_signing_keys_are_required_with_a_shared_database_and_a_broker(db_dsn):
    with pytest.raises(SettingsError, match="PAYSVC_EVENT_SIGNING_KEYS"):
        create_app(make_settings(db_dsn, amqp_url="amqp://guest:guest@127.0.0.1:5672/"), db_dsn)
    async with running_api(db_dsn) as api:  # no broker: nothing signs, nothing to list
        r = await api.client.get("/v1/keys/events")
        assert await r.json() == {"keys": []}


async def test_replay_pages_through_one_agencys_events_only(db_dsn, invoice_body):
    async with running_api(db_dsn) as api:
        moi = await api.portal("MOI")
        mpwt = await api.portal("MPWT")
        treasury = {"Authorization": f"Bearer {await api.key(None, scopes=('treasury',))}"}
        moi_invoices = []
        for _ in range(5):
            r = await api.client.post("/v1/invoices", json=invoice_body(), headers=moi)
            moi_invoices.append((await r.json())["id"])
        for _ in range(2):
            await api.client.post("/v1/invoices", json=invoice_body(), headers=mpwt)
        await api.client.post(f"/v1/invoices/{moi_invoices[1]}/cancel", headers=moi)

        pages, after = [], 0
        while True:
            r = await api.client.get("/v1/events", params={"after": after, "limit": 2}, headers=moi)
            assert r.status == 200, await r.text()
            page = await r.json()
            pages.append([e["seq"] for e in page["data"]])
            after = page["next_after"]
            if not page["has_more"]:
                break
        assert pages == [[1, 2], [3, 4], [5, 6]]
        r = await api.client.get("/v1/events", params={"after": 4}, headers=moi)
        page = await r.json()
        assert page["agency"] == "MOI"
        assert [(e["seq"], e["type"]) for e in page["data"]] == [(5, "invoice.created"), (6, "invoice.cancelled")]
        assert page["data"][1]["data"]["invoice_id"] == moi_invoices[1]
        assert set(page["data"][0]) == {"event_id", "type", "schema_version", "agency", "seq", "occurred_at", "data"}
        r = await api.client.get("/v1/events", params={"after": 6}, headers=moi)
        assert await r.json() == {"agency": "MOI", "data": [], "next_after": 6, "has_more": False}
        # a cursor past the newest seq was never given out: refused, naming the newest
        r = await api.client.get("/v1/events", params={"after": 500}, headers=moi)
        body = await r.json()
        assert r.status == 422 and body["errors"][0]["field"] == "after" and "seq 6" in body["detail"], body
        r = await api.client.get("/v1/events", params={"after": 3}, headers=mpwt)
        assert r.status == 422 and "seq 2" in (await r.json())["detail"]

        r = await api.client.get("/v1/events", headers=mpwt)
        assert [(e["agency"], e["seq"]) for e in (await r.json())["data"]] == [("MPWT", 1), ("MPWT", 2)]
        # another agency's feed is not found (404, as for an agency that does not exist; never 403)
        for other in ("MPWT", "NOPE"):
            r = await api.client.get("/v1/events", params={"agency": other}, headers=moi)
            assert r.status == 404 and "reads only its own events" in (await r.json())["detail"]
        r = await api.client.get("/v1/events", headers=treasury)
        assert r.status == 422
        r = await api.client.get("/v1/events", params={"agency": "MPWT"}, headers=treasury)
        assert [e["agency"] for e in (await r.json())["data"]] == ["MPWT", "MPWT"]
        r = await api.client.get("/v1/events")
        assert r.status == 401
        write_only = {"Authorization": f"Bearer {await api.key('MOI', scopes=('invoices:write',))}"}
        assert (await api.client.get("/v1/events", headers=write_only)).status == 403


async def _tail(broker: Broker, keys_url: str, *extra: str) -> tuple[int, str, str]:
    env = broker.env("unused")
    del env["PAYSVC_DATABASE_URL"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "paysvc", "events", "tail", "--agency", "MOI", "--keys-url", keys_url, *extra,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_tail_prints_verified_events_and_refuses_a_tampered_one(db_dsn, broker: Broker, invoice_body):
    async with running_api(db_dsn, **broker.settings()) as api:
        headers = await api.portal("MOI")
        keys_url = str(api.client.make_url("/v1/keys/events"))
        relay = await make_relay(db_dsn, broker)
        try:
            for _ in range(2):
                await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
            assert await relay.drain() == 2

            code, out, err = await _tail(broker, keys_url, "--max-messages", "2")
            assert code == 0, err
            printed = [json.loads(line) for line in out.splitlines()]
            assert [(e["agency"], e["seq"], e["type"]) for e in printed] == [("MOI", 1, "invoice.created"),
                                                                            ("MOI", 2, "invoice.created")]

            # Someone with access to the broker changes an event on its way: the amount of invoice 3.
            await api.client.post("/v1/invoices", json=invoice_body(amount=50000), headers=headers)
            assert await relay.drain() == 1
        finally:
            await close_relay(relay)
        connection = await aio_pika.connect(broker.url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(broker.queue("MOI"), passive=True)
            genuine = await queue.get(timeout=5)
            await genuine.ack()
            forged = genuine.body.replace(b'"amount":50000', b'"amount":5')
            assert forged != genuine.body
            await channel.default_exchange.publish(
                aio_pika.Message(forged, headers=genuine.headers, message_id=genuine.message_id,
                                 content_type="application/json"), routing_key=broker.queue("MOI"))

            code, out, err = await _tail(broker, keys_url, "--idle-exit", "2")
            assert code == 3
            assert out == ""
            assert f"VERIFY FAILED message_id={genuine.message_id}" in err
            assert "signature does not match the body" in err
            await asyncio.sleep(0.2)
            left = await channel.declare_queue(broker.queue("MOI"), passive=True)
            assert left.declaration_result.message_count == 1, "the bad message stays for an operator"
        finally:
            await connection.close()

    # The genuine one still verifies: the refusal is about the change, not the consumer.
    async with running_api(db_dsn, **broker.settings()) as api:
        connection = await aio_pika.connect(broker.url)
        channel = await connection.channel()
        queue = await channel.declare_queue(broker.queue("MOI"), passive=True)
        await queue.purge()
        await channel.default_exchange.publish(
            aio_pika.Message(genuine.body, headers=genuine.headers, message_id=genuine.message_id),
            routing_key=broker.queue("MOI"))
        await connection.close()
        code, out, err = await _tail(broker, str(api.client.make_url("/v1/keys/events")), "--idle-exit", "1")
        assert code == 0, err
        assert json.loads(out)["event_id"] == genuine.message_id


async def test_tail_refuses_another_agencys_event_and_dedupes_on_the_signed_event_id(db_dsn, broker: Broker,
                                                                                      invoice_body):
    """Found by an agency's walk-through: a genuine event of MPWT copied into MOI's queue verified and was printed
    as MOI's. And dedupe was on the message_id header, which is not signed: a genuine body under another event's
    message_id made the consumer skip that other event when it came."""
    async with running_api(db_dsn, **broker.settings()) as api:
        moi, mpwt = await api.portal("MOI"), await api.portal("MPWT")
        keys_url = str(api.client.make_url("/v1/keys/events"))
        relay = await make_relay(db_dsn, broker)
        try:
            for headers in (moi, moi, moi, mpwt):
                await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
            assert await relay.drain() == 4
        finally:
            await close_relay(relay)
        connection = await aio_pika.connect(broker.url)
        try:
            channel = await connection.channel()
            moi_queue = await channel.declare_queue(broker.queue("MOI"), passive=True)
            first, second, third = [await moi_queue.get(timeout=5) for _ in range(3)]
            other = await (await channel.declare_queue(broker.queue("MPWT"), passive=True)).get(timeout=5)

            async def put(message, message_id=None):
                await channel.default_exchange.publish(
                    aio_pika.Message(message.body, headers=message.headers,
                                     message_id=message_id or message.message_id), routing_key=broker.queue("MOI"))

            # seq 1; seq 1 again under seq 2's message id; seq 3 (2 not seen: a gap); then seq 2 itself
            for message, message_id in ((first, None), (first, second.message_id), (third, None), (second, None)):
                await put(message, message_id)
            for m in (first, second, third, other):
                await m.ack()
            code, out, err = await _tail(broker, keys_url, "--idle-exit", "2")
            assert code == 0, err
            assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 3, 2]
            assert "GAP seq 2..2 not seen yet" in err and "after=1" in err

            await put(other)   # MPWT's genuine event, in MOI's queue
            code, out, err = await _tail(broker, keys_url, "--idle-exit", "2")
            assert code == 3 and out == ""
            assert f"VERIFY FAILED message_id={other.message_id}" in err
            assert "a genuine event of agency 'MPWT', not 'MOI'" in err
            await asyncio.sleep(0.2)
            left = await channel.declare_queue(broker.queue("MOI"), passive=True)
            assert left.declaration_result.message_count == 1, "the message stays for an operator"
            # The operator removes it by its id, and the events after it flow (another id removes nothing)
            await put(third)
            code, out, err = await _tail(broker, keys_url, "--idle-exit", "2", "--discard", "not-this-one")
            assert code == 3 and "VERIFY FAILED" in err and out == ""
            code, out, err = await _tail(broker, keys_url, "--idle-exit", "2", "--discard", other.message_id)
            assert code == 0, err
            assert f"DISCARDED message_id={other.message_id}" in err and "a genuine event of agency 'MPWT'" in err
            assert [json.loads(line)["seq"] for line in out.splitlines()] == [3]
            await asyncio.sleep(0.2)
            left = await channel.declare_queue(broker.queue("MOI"), passive=True)
            assert left.declaration_result.message_count == 0
        finally:
            await connection.close()


async def test_agencies_add_declares_the_agency_queue(db_dsn):
    """`paysvc agencies add` with a broker configured leaves a durable queue bound to CODE.# ready to consume."""
    import os
    import subprocess
    import sys
    import uuid

    import aio_pika

    from tests.conftest import TEST_PII_KEYS

    suffix = uuid.uuid4().hex[:8]
    exchange, prefix = f"paysvc.test.{suffix}", f"agency.{suffix}."
    env = {**os.environ, "PAYSVC_DATABASE_URL": db_dsn, "PAYSVC_PII_KEYS": TEST_PII_KEYS,
           "PAYSVC_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/", "PAYSVC_EVENTS_EXCHANGE": exchange,
           "PAYSVC_EVENTS_QUEUE_PREFIX": prefix, "PAYSVC_SANDBOX_SECRET": "x"}
    out = subprocess.run([sys.executable, "-m", "paysvc", "agencies", "add", "MOI", "--name", "MOI Fees Office",
                          "--name-km", "ក្រសួងមហាផ្ទៃ", "--bakong-account", "moi@nbcq"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{prefix}MOI", passive=True)  # raises if it does not exist
        ex = await channel.get_exchange(exchange, ensure=True)
        await ex.publish(aio_pika.Message(b"{}"), routing_key="MOI.invoice.created")
        await asyncio.sleep(0.3)
        message = await queue.get(no_ack=True, fail=False)
        assert message is not None and message.body == b"{}"
    finally:
        channel = await connection.channel()
        await channel.queue_delete(f"{prefix}MOI")
        await channel.exchange_delete(exchange)
        await connection.close()


async def test_tail_whose_reader_went_away_stops_quietly_and_leaves_the_message(db_dsn, broker: Broker, invoice_body):
    """`paysvc events tail | head` ending: not reported as a broker failure (found by review), and the message
    it could not print stays in the queue."""
    import os

    async with running_api(db_dsn, **broker.settings()) as api:
        await api.client.post("/v1/invoices", json=invoice_body(), headers=await api.portal("MOI"))
        relay = await make_relay(db_dsn, broker)
        try:
            assert await relay.drain() == 1
        finally:
            await close_relay(relay)
        env = broker.env("unused")
        del env["PAYSVC_DATABASE_URL"]
        read_end, write_end = os.pipe()
        os.close(read_end)                                   # the reader is gone before anything is printed
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "paysvc", "events", "tail", "--agency", "MOI", "--idle-exit", "2",
                "--keys-url", str(api.client.make_url("/v1/keys/events")), env=env, stdout=write_end,
                stderr=asyncio.subprocess.PIPE)
        finally:
            os.close(write_end)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 141, err.decode()
        assert b"broker" not in err and b"Traceback" not in err, err.decode()
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        await asyncio.sleep(0.2)
        left = await channel.declare_queue(broker.queue("MOI"), passive=True)
        assert left.declaration_result.message_count == 1
    finally:
        await connection.close()


async def test_the_signed_feed_gives_the_brokers_exact_messages_which_verify_like_them(db_dsn, broker: Broker,
                                                                                      invoice_body):
    # A consumer that met a message failing verification fetches the event from the feed: with signed=true it
    # gets the very bytes the broker carried, signed as they were, so it verifies the copy as it would the
    # message (before, the feed's copy could be trusted only on the TLS certificate).
    from paysvc.event_keys import KEY_ID_HEADER, SIGNATURE_HEADER, verify
    from tests.test_events_support import wait_until

    async with running_api(db_dsn, background=True, **broker.settings()) as api:
        client = api.client
        moi = await api.portal("MOI")
        got = await broker.consume("MOI")
        for _ in range(3):
            assert (await client.post("/v1/invoices", json=invoice_body(), headers=moi)).status == 201
        await wait_until(lambda: len(got) == 3, 10, "the three events, published")
        keys = {k["key_id"]: base64.b64decode(k["public_key"])
                for k in (await (await client.get("/v1/keys/events")).json())["keys"]}
        r = await client.get("/v1/events", params={"signed": "true", "limit": 2}, headers=moi)
        assert r.status == 200, await r.text()
        page = await r.json()
        r = await client.get("/v1/events", params={"signed": "true", "after": 2}, headers=moi)
        messages = page["messages"] + (await r.json())["messages"]
        assert [m["seq"] for m in messages] == [1, 2, 3]
        for m, received in zip(messages, got):
            assert m["body"].encode() == received.body  # the same bytes as the broker's message
            assert (m["key_id"], m["signature"]) == (received.headers[KEY_ID_HEADER],
                                                     received.headers[SIGNATURE_HEADER])
            assert verify(keys, m["key_id"], m["signature"], m["body"].encode()) is None
        assert [json.loads(m["body"]) for m in messages[:2]] == page["data"]
        tampered = messages[0]["body"].replace('"seq":1', '"seq":7').encode()
        assert verify(keys, messages[0]["key_id"], messages[0]["signature"], tampered) is not None
        plain = await (await client.get("/v1/events", headers=moi)).json()
        assert "messages" not in plain  # only when asked for
        # Signing runs on the request's loop: a signed page is at most 100 events (a plain one, 1000).
        r = await client.get("/v1/events", params={"signed": "true", "limit": 101}, headers=moi)
        body = await r.json()
        assert r.status == 422 and body["errors"][0]["field"] == "limit", body
        assert "limit=100 or less" in body["errors"][0]["message"]
        assert (await client.get("/v1/events", params={"limit": 1000}, headers=moi)).status == 200


async def test_the_signed_feed_is_refused_where_nothing_signs(db_dsn):
    async with running_api(db_dsn) as api:  # a shared database and no broker: no signing key
        moi = await api.portal("MOI")
        r = await api.client.get("/v1/events", params={"signed": "true"}, headers=moi)
        body = await r.json()
        assert r.status == 422 and body["errors"][0]["field"] == "signed", body
        assert "without signed=true" in body["detail"]


def test_the_documented_verification_code_verifies_ours_and_refuses_the_rest():
    """The Python in docs/events.md, run as written: agencies copy it."""
    import re
    from pathlib import Path

    from cryptography.exceptions import InvalidSignature

    from paysvc.event_keys import EventSigner

    doc = (Path(__file__).parent.parent / "docs" / "events.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "def verified_event" in b]
    scope: dict = {}
    exec(code, scope)
    signer = EventSigner({"e1": bytes(range(32))})
    keys = {k.key_id: scope["Ed25519PublicKey"].from_public_bytes(base64.b64decode(k.public_key))
            for k in signer.public_keys().keys}
    body = json.dumps({"event_id": "6f0c", "type": "invoice.paid", "agency": "MOI", "seq": 1}).encode()
    headers = {"paysvc-key-id": "e1", "paysvc-signature": signer.sign(body)}
    assert scope["verified_event"](keys, body, headers, "MOI")["seq"] == 1
    with pytest.raises(ValueError, match="event of agency MOI, not MPWT"):
        scope["verified_event"](keys, body, headers, "MPWT")
    with pytest.raises(InvalidSignature):
        scope["verified_event"](keys, body.replace(b'"seq": 1', b'"seq": 2'), headers, "MOI")
