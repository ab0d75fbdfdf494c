"""Each enabled provider's configuration, taken from settings."""

from __future__ import annotations

import os
import secrets

from paysvc.settings import Settings, SettingsError, demo_secret


def sandbox_secrets(settings: Settings) -> list[str]:
    """The sandbox signing secrets; without any, a secret kept in the data folder (demo use only)."""
    if settings.sandbox_secret is not None:
        given = [s.strip() for s in settings.sandbox_secret.get_secret_value().split(",") if s.strip()]
        if not given:
            raise SettingsError("PAYSVC_SANDBOX_SECRET: give at least one secret (several, comma separated, while "
                                "rotating)")
        return given
    if settings.database_url is not None:
        raise SettingsError("PAYSVC_SANDBOX_SECRET: required when the sandbox provider is enabled with "
                            "PAYSVC_DATABASE_URL (or remove sandbox from PAYSVC_PROVIDERS)")
    return [demo_secret(settings, "sandbox.secret", lambda: secrets.token_hex(32), "PAYSVC_SANDBOX_SECRET")]


def provider_config(settings: Settings) -> dict[str, dict]:
    config: dict[str, dict] = {}
    for name in settings.provider_names:
        if name == "sandbox":
            config[name] = {"secrets": sandbox_secrets(settings)}
        elif name == "bakong":
            if settings.bakong_token is None:
                raise SettingsError("PAYSVC_BAKONG_TOKEN: required when bakong is in PAYSVC_PROVIDERS")
            config[name] = {"token": settings.bakong_token.get_secret_value(), "base_url": settings.bakong_base_url}
            if settings.bakong_email:
                config[name]["email"] = settings.bakong_email
        elif name == "aba_payway":
            if settings.aba_merchant_id is None or settings.aba_api_key is None:
                raise SettingsError("PAYSVC_ABA_MERCHANT_ID and PAYSVC_ABA_API_KEY: required when aba_payway is "
                                    "in PAYSVC_PROVIDERS")
            config[name] = {"merchant_id": settings.aba_merchant_id,
                            "api_key": settings.aba_api_key.get_secret_value(), "base_url": settings.aba_base_url}
        else:
            config[name] = plugin_config(settings, name)
    return config


def plugin_config(settings: Settings, name: str) -> dict[str, str]:
    """A third-party plugin's configuration: each PAYSVC_<NAME>_<KEY> variable as ``{"key": "value"}`` (keys in
    lower case, values as text). Found by a bank integrator's walk-through: a plugin also got the variables of
    another whose name extends its own (acleda and acleda_demo), and a plugin named like a group of the
    service's own settings (db, events…) would get those."""
    prefix = f"PAYSVC_{name.upper()}_"
    ours = sorted(f for f in type(settings).model_fields if f.upper().startswith(prefix[len("PAYSVC_"):]))
    if ours:
        raise SettingsError(f"PAYSVC_PROVIDERS: a provider named {name!r} would read the service's own settings "
                            f"({', '.join('PAYSVC_' + f.upper() for f in ours[:3])}…) as its configuration; "
                            "register the plugin under another name")
    longer = [f"PAYSVC_{o.upper()}_" for o in settings.provider_names
              if o != name and f"PAYSVC_{o.upper()}_".startswith(prefix)]
    return {k[len(prefix):].lower(): v for k, v in os.environ.items()
            if k.startswith(prefix) and not any(k.startswith(p) for p in longer)}
