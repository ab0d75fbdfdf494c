"""Settings, read once from ``PAYSVC_*`` environment variables and validated at start."""

from __future__ import annotations

import base64
import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


log = logging.getLogger(__name__)


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable and what to fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSVC_", extra="ignore", frozen=True)

    # Where the service listens and how it names itself in links it hands out.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    public_url: str | None = None
    # Admission: requests running at once per instance, and how long one may wait for a slot before it is
    # answered 503 busy (with Retry-After) instead of queueing without bound.
    max_concurrent_requests: int = Field(64, ge=1, le=10_000)
    request_queue_seconds: float = Field(2, gt=0, le=60)
    # The server's event loop: uvloop (installed with the service on Linux and macOS) or asyncio's own.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    # PostgreSQL. Without a URL, an embedded server is started in ``data_dir``.
    database_url: SecretStr | None = None
    data_dir: Path = Path("paysvc-data")
    db_pool_min: int = Field(2, ge=1)
    db_pool_max: int = Field(20, ge=1, le=500)
    # Where the NNNN_name.sql files are; by default the checkout's migrations/ or the copy in the package.
    migrations_dir: Path | None = None

    # RabbitMQ. Without a URL, events wait in the outbox.
    amqp_url: SecretStr | None = None
    # Events (docs/events.md). Exchange and queue names are settings so tests and staging can share a broker.
    events_exchange: str = Field("paysvc.events", min_length=1)
    events_queue_prefix: str = Field("agency.", min_length=1)
    # Ed25519 seeds "kid:base64(32 bytes)", comma separated; the first signs, all are published.
    event_signing_keys: SecretStr | None = None
    events_retention_days: int = Field(35, ge=30)
    relay_batch_size: int = Field(2000, ge=1, le=50_000)
    relay_poll_interval_seconds: float = Field(0.05, gt=0)
    relay_idle_max_seconds: float = Field(0.5, gt=0)  # the longest wait between passes that find nothing
    # The background sequencer's pace. Whatever reads numbered events (the relay, the feed, webhook fan-out)
    # numbers what committed first, so this only keeps the unnumbered backlog short between reads.
    sequencer_interval_seconds: float = Field(1.0, gt=0)
    webhooks_allow_insecure_localhost: bool = False   # also lets deliveries reach loopback addresses
    # Webhooks go only to public internet addresses; these CIDR networks (comma separated) are allowed too,
    # e.g. a government private network where agencies' receivers sit. Never the cloud metadata 169.254.0.0/16.
    webhooks_allowed_networks: str = ""
    webhook_timeout_seconds: float = Field(10, gt=0, le=60)
    webhook_concurrency_per_endpoint: int = Field(4, ge=1, le=100)
    webhook_interval_seconds: float = Field(1, gt=0)

    # Payer data encryption: "kid:base64(32 bytes)" entries, comma separated; the first is used to encrypt.
    pii_keys: SecretStr | None = None

    # KHQR codes live at most 10 minutes (NBC's rule); shorter is allowed.
    khqr_ttl_minutes: float = Field(10, gt=0, le=10)

    # Background work.
    expiry_interval_seconds: float = Field(5, gt=0)
    idempotency_retention_hours: int = Field(48, ge=24)
    # Rejected callbacks (never processed: a bad signature, a payment the provider denied…) are evidence, kept
    # this long, then deleted, so unauthenticated requests cannot fill the database for good.
    inbox_rejected_retention_days: int = Field(90, ge=30)
    # Payer details (personal data) are erased this long after their invoice became final (paid, expired or
    # cancelled), unless an open reconciliation exception names the invoice.
    payer_retention_days: int = Field(365, ge=30)

    # Payment providers enabled on this instance (comma separated), each configured below.
    providers: str = "sandbox"
    sandbox_secret: SecretStr | None = None           # comma separated: the first signs, any verifies
    bakong_token: SecretStr | None = None
    bakong_email: str | None = None  # the token's e-mail: a refused token is renewed (renew_token)
    bakong_base_url: str = "https://api-bakong.nbc.gov.kh/v1"
    bakong_poll_interval_seconds: float = Field(5, gt=0)
    bakong_grace_minutes: float = Field(30, ge=0)
    # A code Bakong never answered about after its grace (an outage, a refused token) is given up after this.
    bakong_give_up_hours: float = Field(72, gt=0)
    aba_merchant_id: str | None = None
    aba_api_key: SecretStr | None = None
    aba_base_url: str = "https://checkout.payway.com.kh"
    inbox_interval_seconds: float = Field(2, gt=0)
    # A callback being processed is left alone this long; after it (a crashed process), the worker takes it.
    inbox_lease_seconds: float = Field(60, gt=0)

    # Settlement and reconciliation (docs/settlement.md). Business days are Asia/Phnom_Penh days ending at the
    # cut-off (local time); a payment unsettled after the grace (business days) becomes an exception.
    business_day_cutoff: str = "23:59:59.999"
    settlement_grace_days: int = Field(2, ge=0, le=60)
    treasury_bank_account: str = Field("nbc-treasury", pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    settlement_max_bytes: int = Field(512 * 1024**2, ge=1024)
    treasury_session_hours: float = Field(8, gt=0, le=24)

    log_level: str = "INFO"

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check_retentions(self) -> "Settings":
        # What a settlement file brings up to the grace after a payment may need both: a rejected callback as its
        # evidence (found by review: 30 days' retention against up to 60 days' grace), the payer's details for
        # what it raises (a refund owed, say).
        least = self.settlement_grace_days + 30
        for variable, days in (("PAYSVC_INBOX_REJECTED_RETENTION_DAYS", self.inbox_rejected_retention_days),
                               ("PAYSVC_PAYER_RETENTION_DAYS", self.payer_retention_days)):
            if days < least:
                raise ValueError(f"{variable} ({days}) must be at least PAYSVC_SETTLEMENT_GRACE_DAYS + 30 ({least})")
        return self

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, v: SecretStr | None) -> SecretStr | None:
        # Found by an operator's walk-through: "notaurl" started, then the relay failed every pass and events
        # piled up in the outbox.
        if v is not None:
            parts = urlsplit(v.get_secret_value())
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError("must be a broker URL, e.g. amqp://user:password@rabbitmq.example:5672/vhost")
        return v

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and urlsplit(v.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a PostgreSQL URL, e.g. postgresql://paysvc:password@db.example:5432/paysvc "
                             "(or postgresql://paysvc@/paysvc?host=/var/run/postgresql for a local socket)")
        return v

    @field_validator("db_pool_max")
    @classmethod
    def _check_pool(cls, v: int, info: ValidationInfo) -> int:
        low = info.data.get("db_pool_min")
        if low is not None and low > v:
            raise ValueError(f"must be at least PAYSVC_DB_POOL_MIN ({low})")
        return v

    @field_validator("pii_keys")
    @classmethod
    def _check_pii_keys(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_pii_keys(v.get_secret_value())
        return v

    @field_validator("event_signing_keys")
    @classmethod
    def _check_event_signing_keys(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            from paysvc.event_keys import parse_signing_keys  # here: event_keys imports this module

            parse_signing_keys(v.get_secret_value())
        return v

    @field_validator("webhooks_allowed_networks")
    @classmethod
    def _check_networks(cls, v: str) -> str:
        from paysvc.webhook_targets import parse_networks

        return ",".join(str(n) for n in parse_networks(v))

    @field_validator("business_day_cutoff")
    @classmethod
    def _check_cutoff(cls, v: str) -> str:
        from paysvc.settlement_days import parse_cutoff

        parse_cutoff(v)
        return v.strip()

    @field_validator("bakong_give_up_hours")
    @classmethod
    def _check_give_up(cls, v: float, info: ValidationInfo) -> float:
        grace = info.data.get("bakong_grace_minutes")
        if grace is not None and v * 60 <= grace:
            raise ValueError(f"must be longer than PAYSVC_BAKONG_GRACE_MINUTES ({grace:g} minutes): a code is asked "
                             "about until Bakong answers after its grace, and never past this")
        return v

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return v

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, v: str) -> str:
        names = [n.strip() for n in v.split(",") if n.strip()]
        if len(set(names)) != len(names):
            raise ValueError("a provider is listed twice")
        return ",".join(names)

    @property
    def provider_names(self) -> list[str]:
        return [n for n in self.providers.split(",") if n]

    @property
    def base_url(self) -> str:
        """The base of the links handed out: ``public_url``, else this machine as the service listens on it.
        Listening on every address (``0.0.0.0``, ``::``, as in the container image) names ``localhost``: the
        wildcard is no address a browser can open; an IPv6 address is bracketed."""
        if self.public_url:
            return self.public_url
        host = self.host
        if host in WILDCARD_HOSTS:
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def links_guessed(self) -> bool:
        """Whether the links name an address guessed from the listening one, which other machines may not reach
        (no ``public_url``, listening beyond loopback)."""
        return self.public_url is None and self.host not in ("127.0.0.1", "localhost", "::1")


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def parse_keyring(raw: str, what: str) -> dict[str, bytes]:
    """Parse ``kid:base64(32 bytes),...`` into an ordered mapping; the first key is the active one.

    ``what`` names the key in messages, e.g. "AES-256 key" or "Ed25519 seed".
    """
    keys: dict[str, bytes] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        kid, sep, b64 = part.partition(":")
        if not sep or not kid:
            raise ValueError(f"each entry must look like 'kid:base64(32-byte {what})'")
        if kid in keys:
            raise ValueError(f"key id {kid!r} is listed twice")
        try:
            key = base64.b64decode(b64, validate=True)
        except ValueError:  # binascii.Error is a ValueError
            raise ValueError(f"key {kid!r} is not valid base64") from None
        if len(key) != 32:
            raise ValueError(f"key {kid!r} must decode to a 32-byte {what}, got {len(key)} bytes")
        keys[kid] = key
    if not keys:
        raise ValueError("no key given")
    return keys


def parse_pii_keys(raw: str) -> dict[str, bytes]:
    """The payer-data keys (AES-256-GCM): the first encrypts, all decrypt."""
    return parse_keyring(raw, "AES-256 key")


def demo_secret(settings: Settings, filename: str, make: Callable[[], str], what: str) -> str:
    """A secret kept in the data folder, made once (mode 0600): for running without configuration only.

    Several instances must share their keys, so callers use this only when no database URL is set.
    """
    path = settings.data_dir / filename
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(make())
            log.warning("%s is not configured: generated one in %s (fine for a demo, not for production)",
                        what, path)
    return path.read_text().strip()


# Variables of this prefix that are not settings but are read by this project's tests and benchmarks.
_NOT_SETTINGS = ("PAYSVC_TEST_", "PAYSVC_BENCH_")


def unknown_variables(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """``PAYSVC_…`` variables that are neither a setting nor an enabled provider's configuration
    (``PAYSVC_<PROVIDER>_…``), each with the setting it may be a misspelling of (found by an operator's
    walk-through: ``PAYSVC_PII_KEY`` was ignored without a word)."""
    known = {f"PAYSVC_{f.upper()}" for f in type(settings).model_fields}
    providers = tuple(f"PAYSVC_{n.upper()}_" for n in settings.provider_names)
    out = []
    for name in sorted(environ):
        if (not name.startswith("PAYSVC_") or name in known or name.startswith(_NOT_SETTINGS)
                or name.startswith(providers)):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


def load_settings(**overrides) -> Settings:
    """Build settings from the environment, raising ``SettingsError`` naming each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            field = ".".join(str(p) for p in err["loc"])
            cause = (err.get("ctx") or {}).get("error")  # a validator's own words, without "Value error, "
            message = cause if isinstance(cause, ValueError) else err["msg"]
            lines.append(f"PAYSVC_{field.upper()}: {message}" if field else str(message))  # a rule over several
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
