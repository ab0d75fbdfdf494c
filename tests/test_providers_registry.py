"""The registry finds plugins through the ``paysvc.providers`` entry-point group, as a third party's would be."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from providers import (GROUP, Provider, ProviderConfigError, UnknownProvider, available_providers, load_providers)
from providers.aba_payway import PayWayProvider
from providers.bakong import BakongProvider
from providers.sandbox import SandboxProvider

CONFIG = {
    "sandbox": {"secrets": ["s1", "s0"]},
    "bakong": {"token": "t", "base_url": "http://127.0.0.1:1/v1"},
    "aba_payway": {"merchant_id": "ec000002", "api_key": "k", "base_url": "http://127.0.0.1:1"},
}


def test_our_three_plugins_are_registered_as_entry_points():
    registered = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    assert registered["sandbox"] == "providers.sandbox:create"
    assert registered["bakong"] == "providers.bakong:create"
    assert registered["aba_payway"] == "providers.aba_payway:create"
    assert {"sandbox", "bakong", "aba_payway"} <= set(available_providers())


async def test_load_providers_builds_each_configured_provider():
    built = load_providers(CONFIG)
    try:
        assert set(built) == {"sandbox", "bakong", "aba_payway"}
        assert isinstance(built["sandbox"], SandboxProvider)
        assert isinstance(built["bakong"], BakongProvider)
        assert isinstance(built["aba_payway"], PayWayProvider)
        assert {n: p.pattern for n, p in built.items()} == {
            "sandbox": "signed_push", "bakong": "pull", "aba_payway": "push_confirm"}
        assert all(isinstance(p, Provider) and p.name == n for n, p in built.items())
    finally:
        for p in built.values():
            await p.aclose()


def test_only_the_named_providers_are_built():
    assert list(load_providers({"sandbox": CONFIG["sandbox"]})) == ["sandbox"]
    assert load_providers({}) == {}


def test_unknown_name_lists_what_is_available():
    with pytest.raises(UnknownProvider) as err:
        load_providers({"wing": {}})
    message = str(err.value)
    assert "'wing'" in message and all(name in message for name in ("aba_payway", "bakong", "sandbox"))
    assert isinstance(err.value, LookupError) and err.value.code == "provider_unknown"


def test_a_plugin_refusing_its_config_says_which_key():
    with pytest.raises(ProviderConfigError, match="token"):
        load_providers({"bakong": {}})
    with pytest.raises(ProviderConfigError, match="api_key"):
        load_providers({"aba_payway": {"merchant_id": "m"}})


@pytest.mark.parametrize("returned, says", [
    ("other_name", "it returned a SandboxProvider named 'sandbox' with pattern 'signed_push'"),
    ("object", "it returned an instance of object, which lacks the Provider protocol's methods"),
])
def test_a_plugin_returning_the_wrong_thing_is_told_what_it_returned(monkeypatch, returned, says):
    from importlib.metadata import EntryPoint

    from providers import registry
    from providers.sandbox import create

    def factory(config):
        return create({"secrets": ["s"]}) if returned == "other_name" else object()

    monkeypatch.setattr(registry, "_entry_points", lambda: {"acleda_demo": EntryPoint(
        name="acleda_demo", value="x:y", group=registry.GROUP)})
    monkeypatch.setattr(EntryPoint, "load", lambda self: factory)
    with pytest.raises(ProviderConfigError) as got:
        registry.load_providers({"acleda_demo": {}})
    assert "did not return a Provider named 'acleda_demo'" in str(got.value) and says in str(got.value)
