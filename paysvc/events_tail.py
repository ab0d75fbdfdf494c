"""The reference consumer (``paysvc events tail``): what an agency's own consumer has to do, and no more.

1. Fetch the public keys from ``/v1/keys/events`` (again when a message names a key not seen yet: rotation).
2. For each message of the agency's queue, verify the Ed25519 signature in ``paysvc-signature`` over the exact
   body bytes, with the key named by ``paysvc-key-id``; then check that the signed body is this agency's event
   (``agency``): a genuine event of another agency, in this queue by a wrong binding or copied there, verifies
   too (found by an agency's walk-through: it was printed as the agency's own).
3. Verified: skip it if its ``event_id`` (in the signed body; the ``message_id`` header is not signed) was already
   handled (delivery is at least once), else handle it (here: print the body, one JSON object per line), then ack.
   A ``seq`` above the next expected one in this run is a gap, said on standard error (the missing event comes
   again, or is fetched from ``GET /v1/events?after=``).
4. Not verified: print ``VERIFY FAILED …`` on standard error, leave the message in the queue (it is not acked)
   and exit with status 3. Handling later messages would skip one and break the agency's seq order; an operator
   looks at it, fetches the genuine event from ``GET /v1/events?signed=true`` (verified like a message), and removes
   the bad message (``--discard MESSAGE_ID``: that message, if it fails verification, is rejected, not requeued).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import sys
from typing import TextIO

import aio_pika
import aiohttp

from paysvc.event_keys import KEY_ID_HEADER, SIGNATURE_HEADER, verify

VERIFY_FAILED_EXIT = 3


class KeysUnavailable(Exception):
    """The public keys could not be fetched or read."""


async def fetch_keys(url: str) -> dict[str, bytes]:
    """``key_id`` -> raw 32-byte Ed25519 public key, from ``GET /v1/keys/events``."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(url) as response:
                response.raise_for_status()
                document = await response.json()
        return {k["key_id"]: base64.b64decode(k["public_key"]) for k in document["keys"]
                if k["algorithm"] == "Ed25519"}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise KeysUnavailable(f"cannot read the public keys from {url}: {exc!r}") from None


def _header(message: aio_pika.abc.AbstractIncomingMessage, name: str) -> str | None:
    value = (message.headers or {}).get(name)
    return value.decode() if isinstance(value, bytes) else value


def _own_event(body: bytes, agency: str) -> tuple[dict, None] | tuple[None, str]:
    """The event a verified body holds, when it is an event of ``agency`` to handle; else why not."""
    try:
        event = json.loads(body)
    except ValueError:
        return None, "the signed body is not JSON"
    if not isinstance(event, dict) or not isinstance(event.get("event_id"), str) or type(event.get("seq")) is not int:
        return None, "the signed body is not an event (no event_id or seq)"
    if event.get("agency") != agency:
        return None, (f"a genuine event of agency {event.get('agency')!r}, not {agency!r}: check the queue's "
                      f"bindings (only {agency}.#) and who may publish to it")
    return event, None


async def tail(amqp_url: str, queue_name: str, keys_url: str, *, agency: str, max_messages: int | None = None,
               idle_exit: float | None = None, discard: str | None = None, out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    keys = await fetch_keys(keys_url)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.declare_queue(queue_name, passive=True)
        arrivals: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(arrivals.put)
        seen: collections.OrderedDict[str, None] = collections.OrderedDict()  # recent event ids, for dedup
        printed, last_seq = 0, None
        while max_messages is None or printed < max_messages:
            try:
                async with asyncio.timeout(idle_exit):  # not wait_for: on 3.11 it can swallow a cancellation
                    message = await arrivals.get()
            except TimeoutError:
                return 0
            key_id, signature = _header(message, KEY_ID_HEADER), _header(message, SIGNATURE_HEADER)
            if key_id is not None and key_id not in keys:
                keys = await fetch_keys(keys_url)  # a key rotated in since we started
            event, problem = None, verify(keys, key_id, signature, message.body)
            if problem is None:
                event, problem = _own_event(message.body, agency)
            if problem is not None and discard is not None and message.message_id == discard:
                # The operator named it, having fetched the genuine event from the feed: removed (rejected without
                # requeue: a dead-letter exchange on the queue keeps it), once (found by an agency's walk-through:
                # no command removed a bad message)
                await message.reject(requeue=False)
                print(f"DISCARDED message_id={message.message_id} key_id={key_id}: {problem}", file=err, flush=True)
                discard = None
                continue
            if problem is not None:
                print(f"VERIFY FAILED message_id={message.message_id} routing_key={message.routing_key} "
                      f"key_id={key_id}: {problem}; the message is left in {queue_name}", file=err, flush=True)
                return VERIFY_FAILED_EXIT
            assert event is not None
            if event["event_id"] not in seen:
                if last_seq is not None and event["seq"] > last_seq + 1:
                    print(f"GAP seq {last_seq + 1}..{event['seq'] - 1} not seen yet (it comes again, or fetch it "
                          f"from GET /v1/events?after={last_seq})", file=err, flush=True)
                last_seq = event["seq"] if last_seq is None else max(last_seq, event["seq"])
                print(message.body.decode(), file=out, flush=True)
                printed += 1
                seen[event["event_id"]] = None
                if len(seen) > 100_000:
                    seen.popitem(last=False)
            await message.ack()
        return 0
    finally:
        await connection.close()
