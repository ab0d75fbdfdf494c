"""``paysvc relay``, ``paysvc events declare`` and ``paysvc events tail``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from datetime import timedelta

log = logging.getLogger("paysvc.relay")


def _amqp_url(settings, given: str | None = None) -> str:
    from paysvc.cli import CliError

    if given:
        return given
    if settings.amqp_url is None:
        raise CliError("PAYSVC_AMQP_URL is not set: give the broker's URL, e.g. amqp://user:pass@host:5672/")
    return settings.amqp_url.get_secret_value()


async def _relay(settings, dsn: str, once: bool) -> int:
    from paysvc.db import create_pool
    from paysvc.event_keys import signer_from_settings
    from paysvc.relay import Relay

    signer = signer_from_settings(settings)
    assert signer is not None  # required (or generated) whenever a broker is configured
    pool = await create_pool(dsn, settings)
    relay = Relay(pool, _amqp_url(settings), signer, exchange=settings.events_exchange,
                  queue_prefix=settings.events_queue_prefix, batch_size=settings.relay_batch_size,
                  poll_interval=settings.relay_poll_interval_seconds, idle_max=settings.relay_idle_max_seconds,
                  retention=timedelta(days=settings.events_retention_days))
    try:
        if once:
            return await relay.drain()
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await relay.run()
        return relay.published
    except asyncio.CancelledError:
        return relay.published
    finally:
        await relay.close()
        await pool.close()


def cmd_relay(settings, args) -> int:
    from paysvc.cli import CliError, _migrate, database
    from paysvc.relay import BrokerUnreachable

    _amqp_url(settings)
    with database(settings) as dsn:
        asyncio.run(_migrate(dsn, settings))
        print("paysvc relay publishing the outbox (Ctrl-C to stop)" if not args.once else "paysvc relay: draining",
              file=sys.stderr)
        try:
            n = asyncio.run(_relay(settings, dsn, args.once))
        except BrokerUnreachable as exc:  # --once: one line saying what to check, not a traceback
            raise CliError(f"{exc}; the events stay in the outbox") from None
    print(f"published {n} events", file=sys.stderr)
    return 0


def cmd_declare(settings, args) -> int:
    from paysvc.cli import CliError
    from paysvc.relay import broker_error, declare_agency_queue

    url = _amqp_url(settings)
    try:
        name = asyncio.run(declare_agency_queue(url, args.agency, exchange=settings.events_exchange,
                                                queue_prefix=settings.events_queue_prefix))
    except Exception as exc:
        why = broker_error(exc, url)
        if why is None:
            raise
        raise CliError(why) from None
    print(name)
    return 0


def cmd_tail(settings, args) -> int:
    from paysvc.cli import CliError, reader_gone
    from paysvc.events_tail import KeysUnavailable, tail
    from paysvc.relay import broker_error

    keys_url = args.keys_url or f"{settings.base_url}/v1/keys/events"
    url, queue = _amqp_url(settings, args.amqp_url), f"{settings.events_queue_prefix}{args.agency}"
    try:
        return asyncio.run(tail(url, queue, keys_url, agency=args.agency, max_messages=args.max_messages,
                                idle_exit=args.idle_exit, discard=args.discard))
    except KeysUnavailable as exc:
        raise CliError(f"{exc}; is the service running there, or give --keys-url") from None
    except BrokenPipeError:
        return reader_gone()  # the message being printed stays unacked in the queue
    except Exception as exc:
        why = broker_error(exc, url, agency=args.agency, queue=queue)
        if why is None:
            raise
        raise CliError(why) from None


def register(sub) -> None:
    r = sub.add_parser("relay", help="publish the event outbox to RabbitMQ (several may run at once)")
    r.add_argument("--once", action="store_true", help="publish what is waiting, then exit")
    r.set_defaults(func=cmd_relay)

    ev = sub.add_parser("events", help="events to agencies: queues and the reference consumer")
    actions = ev.add_subparsers(dest="action", required=True)
    d = actions.add_parser("declare", help="declare an agency's queue (agency.CODE bound to CODE.#) and the exchange")
    d.add_argument("--agency", required=True, help="agency code, e.g. MOI")
    d.set_defaults(func=cmd_declare)
    t = actions.add_parser("tail", help="consume an agency's queue, verify each signature, print one JSON per line; "
                                        "exit 3 at the first message that fails verification")
    t.add_argument("--agency", required=True, help="agency code, e.g. MOI")
    t.add_argument("--keys-url", help="where the public keys are (default: PAYSVC_PUBLIC_URL/v1/keys/events)")
    t.add_argument("--amqp-url", help="broker URL (default: PAYSVC_AMQP_URL)")
    t.add_argument("--max-messages", type=int, help="exit 0 after printing this many events")
    t.add_argument("--idle-exit", type=float, help="exit 0 after this many seconds without a message")
    t.add_argument("--discard", metavar="MESSAGE_ID",
                   help="remove the message with this id if it fails verification (as VERIFY FAILED named it), "
                        "once you hold the genuine event from GET /v1/events?signed=true; then go on")
    t.set_defaults(func=cmd_tail)
