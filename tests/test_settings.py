"""Settings: validated at start, and the secrets made once in demo mode."""

from __future__ import annotations

import pytest

from paysvc.settings import SettingsError, load_settings


def test_a_bad_variable_is_named_with_what_to_fix(monkeypatch):
    monkeypatch.setenv("PAYSVC_PII_KEYS", "k1:not-base64!")
    monkeypatch.setenv("PAYSVC_KHQR_TTL_MINUTES", "15")
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value)
    assert "PAYSVC_PII_KEYS" in text and "base64" in text
    assert "PAYSVC_KHQR_TTL_MINUTES" in text and "10" in text


def test_demo_mode_makes_each_secret_once_and_keeps_it(tmp_path):
    """Without configuration, the payer-data key, the event signing key and the sandbox secret are made
    once in the data folder (owner-only) and reused, so a restart can still read what it wrote."""
    from paysvc.event_keys import signer_from_settings
    from paysvc.pii import cipher_from_settings
    from paysvc.provider_settings import sandbox_secrets
    from paysvc.settings import Settings

    settings = Settings(data_dir=tmp_path)
    blob = cipher_from_settings(settings).encrypt({"name": "Sok"}, aad="inv_1")
    again = cipher_from_settings(settings)
    assert again.decrypt(*blob, aad="inv_1") == {"name": "Sok"}
    assert signer_from_settings(settings).active_key_id == signer_from_settings(settings).active_key_id
    assert sandbox_secrets(settings) == sandbox_secrets(settings)
    for name in ("pii.key", "event-signing.key", "sandbox.secret"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


def test_the_server_runs_on_uvloop_unless_told_otherwise(monkeypatch):
    import asyncio

    import uvloop

    from paysvc.cli import _event_loop
    from paysvc.settings import Settings

    for setting, kind in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = _event_loop(Settings(event_loop=setting))
        try:
            assert isinstance(loop, kind) and (setting == "uvloop") == isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
    monkeypatch.setenv("PAYSVC_EVENT_LOOP", "trio")
    with pytest.raises(SettingsError, match="PAYSVC_EVENT_LOOP"):
        load_settings()


@pytest.mark.parametrize("host, port, public_url, base, guessed", [
    ("127.0.0.1", 8080, None, "http://127.0.0.1:8080", False),
    ("0.0.0.0", 8080, None, "http://localhost:8080", True),   # the container image listens on every address
    ("::", 9000, None, "http://localhost:9000", True),
    ("fd00::5", 8080, None, "http://[fd00::5]:8080", True),
    ("0.0.0.0", 8080, "https://pay.gov.kh/", "https://pay.gov.kh", False),
])
def test_links_name_an_address_a_browser_can_open(host, port, public_url, base, guessed):
    """Found by review: listening on 0.0.0.0 without PAYSVC_PUBLIC_URL, every pay_url named http://0.0.0.0:8080,
    and an IPv6 address came out unbracketed (http://:::8080)."""
    from paysvc.settings import Settings

    settings = Settings(host=host, port=port, public_url=public_url)
    assert (settings.base_url, settings.links_guessed) == (base, guessed)


def test_the_bakong_give_up_time_must_outlast_the_grace(monkeypatch):
    """Found by review: a grace raised past 72 hours (as advice for long outages once said) silently ended the
    polling at the give-up time."""
    monkeypatch.setenv("PAYSVC_BAKONG_GRACE_MINUTES", "5000")
    with pytest.raises(SettingsError, match="PAYSVC_BAKONG_GIVE_UP_HOURS: .*longer than PAYSVC_BAKONG_GRACE_MINUTES"):
        load_settings()
    monkeypatch.setenv("PAYSVC_BAKONG_GIVE_UP_HOURS", "100")
    assert load_settings().bakong_give_up_hours == 100


def test_a_third_party_plugin_gets_its_own_variables_only(monkeypatch):
    """Found by a bank integrator's walk-through: plugin acleda also got acleda_demo's variables."""
    from paysvc.provider_settings import plugin_config
    from paysvc.settings import Settings

    monkeypatch.setenv("PAYSVC_ACLEDA_SECRET", "a")
    monkeypatch.setenv("PAYSVC_ACLEDA_DEMO_SECRET", "b")
    monkeypatch.setenv("PAYSVC_ACLEDA_DEMO_BASE_URL", "https://demo.example")
    settings = Settings(providers="sandbox,acleda,acleda_demo")
    assert plugin_config(settings, "acleda") == {"secret": "a"}
    assert plugin_config(settings, "acleda_demo") == {"secret": "b", "base_url": "https://demo.example"}
    # not both enabled: acleda reads every PAYSVC_ACLEDA_… variable, as documented
    assert plugin_config(Settings(providers="sandbox,acleda"), "acleda") == {
        "secret": "a", "demo_secret": "b", "demo_base_url": "https://demo.example"}


@pytest.mark.parametrize("name", ["db", "events", "webhook"])
def test_a_plugin_named_like_the_services_own_settings_is_refused(name):
    from paysvc.provider_settings import plugin_config
    from paysvc.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=f"a provider named '{name}' would read the service's own settings"):
        plugin_config(Settings(providers=f"sandbox,{name}"), name)


def test_rejected_callbacks_are_kept_past_the_settlement_grace():
    """Found by review: 30 days' retention was accepted with 60 days' grace, so the evidence behind a payment a
    late file brings could be gone."""
    from paysvc.settings import load_settings

    with pytest.raises(SettingsError, match=r"PAYSVC_INBOX_REJECTED_RETENTION_DAYS \(30\) must be at least "
                                            r"PAYSVC_SETTLEMENT_GRACE_DAYS \+ 30 \(90\)"):
        load_settings(settlement_grace_days=60, inbox_rejected_retention_days=30)
    assert load_settings(settlement_grace_days=60, inbox_rejected_retention_days=90).inbox_rejected_retention_days == 90


def test_the_sandbox_beside_a_real_database_is_announced_at_start_as_a_risk(caplog, tmp_path):
    """The default provider list is "sandbox": with a real database the service says at start that anyone holding
    its secret can mark invoices paid (found by a security review); not with real providers only, nor in the demo
    on its embedded database. (Commands such as a settlement import say nothing of it: their answers are one
    line.)"""
    import logging

    from paysvc.app import create_app
    from paysvc.settings import Settings

    dsn = "postgresql://postgres@127.0.0.1:5432/not_used"  # creating the app connects to nothing
    keys = "k1:" + "A" * 43 + "="
    with caplog.at_level(logging.WARNING, logger="paysvc.app"):
        create_app(Settings(database_url=dsn, sandbox_secret="s3cret", pii_keys=keys), dsn)
    warned = [r.getMessage() for r in caplog.records]
    assert any("can mark invoices paid with no money moved" in m for m in warned), warned
    assert not any("s3cret" in m for m in warned)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="paysvc.app"):
        create_app(Settings(database_url=dsn, providers="bakong", bakong_token="t", pii_keys=keys), dsn)
        create_app(Settings(data_dir=str(tmp_path)), dsn)  # the demo: its own secret, its embedded database
    assert not [r for r in caplog.records if r.name == "paysvc.app"]


def test_a_misspelt_variable_is_named_at_start_with_the_setting_it_may_mean(caplog, monkeypatch, tmp_path):
    """Found by an operator's walk-through: PAYSVC_PII_KEY (for PAYSVC_PII_KEYS) was ignored without a word. Enabled
    providers' own variables, and this project's test and benchmark variables, are not settings but known."""
    import logging

    from paysvc.app import create_app
    from paysvc.settings import Settings, unknown_variables

    env = {"PAYSVC_PII_KEY": "x", "PAYSVC_PORTT": "1", "PAYSVC_ACLEDA_SECRET": "a", "PAYSVC_NONSENSE": "1",
           "PAYSVC_TEST_DATABASE_URL": "x", "PAYSVC_BENCH_AMQP_URL": "x", "PAYSVC_PORT": "8080", "HOME": "/root"}
    settings = Settings(providers="sandbox,acleda")
    assert unknown_variables(settings, env) == ["PAYSVC_NONSENSE", "PAYSVC_PII_KEY (did you mean PAYSVC_PII_KEYS?)",
                                                "PAYSVC_PORTT (did you mean PAYSVC_PORT?)"]
    # acleda not enabled: its variable is ignored too, and said so
    assert "PAYSVC_ACLEDA_SECRET" in unknown_variables(Settings(), env)
    monkeypatch.setenv("PAYSVC_PII_KEY", "x")
    with caplog.at_level(logging.WARNING, logger="paysvc.app"):
        create_app(Settings(data_dir=str(tmp_path)), "postgresql://postgres@127.0.0.1:5432/not_used")
    assert any(r.getMessage() == "ignored, not paysvc settings: PAYSVC_PII_KEY (did you mean PAYSVC_PII_KEYS?)"
               for r in caplog.records), [r.getMessage() for r in caplog.records]
