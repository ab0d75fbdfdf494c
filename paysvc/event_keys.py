"""Ed25519 keys that sign event messages, and the verification an agency repeats on its side.

The private keys come from ``PAYSVC_EVENT_SIGNING_KEYS`` (``kid:base64(32-byte seed),...``): the first signs,
the others are still published so messages signed before a rotation keep verifying. They are never stored in
the database nor served; ``GET /v1/keys/events`` lists the public halves only.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict

from paysvc.settings import Settings, SettingsError, demo_secret, parse_keyring


SIGNATURE_HEADER = "paysvc-signature"
KEY_ID_HEADER = "paysvc-key-id"
ALGORITHM = "Ed25519"


class PublicKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str
    algorithm: str = ALGORITHM
    public_key: str  # base64 of the raw 32 bytes
    status: str      # "active" signs now; "retiring" verifies older messages until removed


class KeySet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: list[PublicKey]


def parse_signing_keys(raw: str) -> dict[str, bytes]:
    """``kid:base64(seed),...`` to an ordered mapping; the first is the active key."""
    return parse_keyring(raw, "Ed25519 seed")


class EventSigner:
    """Signs message bodies with the active key; knows the public half of every configured key."""

    def __init__(self, seeds: dict[str, bytes]) -> None:
        if not seeds:
            raise ValueError("at least one key is needed")
        self._private = {kid: Ed25519PrivateKey.from_private_bytes(s) for kid, s in seeds.items()}
        self.active_key_id = next(iter(seeds))
        self._active = self._private[self.active_key_id]

    def sign(self, body: bytes) -> str:
        return base64.b64encode(self._active.sign(body)).decode()

    def public_keys(self) -> KeySet:
        return KeySet(keys=[
            PublicKey(key_id=kid,
                      public_key=base64.b64encode(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode(),
                      status="active" if kid == self.active_key_id else "retiring")
            for kid, k in self._private.items()
        ])


def verify(public_keys: dict[str, bytes], key_id: str | None, signature_b64: str | None, body: bytes) -> str | None:
    """``None`` when ``signature_b64`` is ``key_id``'s Ed25519 signature of exactly ``body``; else why not."""
    if not key_id or not signature_b64:
        return "no paysvc-key-id or paysvc-signature header"
    raw_key = public_keys.get(key_id)
    if raw_key is None:
        return f"unknown key id {key_id!r}"
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        Ed25519PublicKey.from_public_bytes(raw_key).verify(signature, body)
    except (ValueError, binascii.Error, InvalidSignature):
        return "signature does not match the body"
    return None


def signer_from_settings(settings: Settings) -> EventSigner | None:
    """The configured keys; in embedded mode a key kept in the data folder.

    With ``PAYSVC_DATABASE_URL`` set, every instance must sign with shared keys, so a key made here is not
    an option: the keys are required when a broker is configured, and ``None`` (nothing signs, nothing is
    listed) is returned without one.
    """
    if settings.event_signing_keys is not None:
        return EventSigner(parse_signing_keys(settings.event_signing_keys.get_secret_value()))
    if settings.database_url is not None:
        if settings.amqp_url is not None:
            raise SettingsError("PAYSVC_EVENT_SIGNING_KEYS: required when PAYSVC_DATABASE_URL and PAYSVC_AMQP_URL "
                                "are set (e.g. 'e1:<base64 of a 32-byte random seed>')")
        return None
    return EventSigner(parse_signing_keys(demo_secret(
        settings, "event-signing.key", lambda: "local:" + base64.b64encode(os.urandom(32)).decode(),
        "PAYSVC_EVENT_SIGNING_KEYS")))
