"""Finding and building provider plugins through the ``paysvc.providers`` entry-point group.

A plugin's distribution declares, in its ``pyproject.toml``::

    [project.entry-points."paysvc.providers"]
    mybank = "mybank_paysvc:create"

where ``create(config: Mapping[str, Any]) -> Provider`` builds the provider from its config dict and
the provider's ``name`` equals the entry-point name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from providers.base import Provider
from providers.errors import ProviderConfigError, ProviderError, UnknownProvider

GROUP = "paysvc.providers"
PATTERNS = ("pull", "push_confirm", "signed_push")

Factory = Callable[[Mapping[str, Any]], Provider]


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        # The same distribution can be seen twice (an editable install's metadata and its build tree).
        if ep.name in found and found[ep.name].value != ep.value:
            raise ProviderConfigError(f"two plugins claim the name {ep.name!r}: {found[ep.name].value} and "
                                      f"{ep.value}")
        found.setdefault(ep.name, ep)
    return found


def available_providers() -> list[str]:
    """The names of every registered provider plugin, sorted."""
    return sorted(_entry_points())


def load_providers(config: Mapping[str, Mapping[str, Any]]) -> dict[str, Provider]:
    """Build each provider named in ``config`` (name → its config dict) with its entry point's factory.

    Raises :class:`UnknownProvider` (listing the available names) for a name no plugin registers, and
    :class:`ProviderConfigError` when a factory refuses its config or returns something that is not a
    provider of that name.
    """
    registered = _entry_points()
    unknown = sorted(set(config) - set(registered))
    if unknown:
        raise UnknownProvider(f"no provider plugin named {', '.join(map(repr, unknown))}; available: "
                              f"{', '.join(sorted(registered)) or 'none'} (entry-point group {GROUP!r})")
    built: dict[str, Provider] = {}
    for name, settings in config.items():
        try:
            factory: Factory = registered[name].load()
        except Exception as exc:
            raise ProviderConfigError(f"cannot load plugin {name!r} ({registered[name].value}): {exc}",
                                      provider=name) from exc
        try:
            provider = factory(dict(settings or {}))
        except ProviderError:
            raise
        except Exception as exc:
            raise ProviderConfigError(f"plugin {name!r} refused its config: {exc}", provider=name) from exc
        if not isinstance(provider, Provider) or getattr(provider, "name", None) != name \
                or getattr(provider, "pattern", None) not in PATTERNS:
            got = (f"a {type(provider).__name__} named {getattr(provider, 'name', None)!r} with pattern "
                   f"{getattr(provider, 'pattern', None)!r}" if isinstance(provider, Provider)
                   else f"an instance of {type(provider).__name__}, which lacks the Provider protocol's methods")
            raise ProviderConfigError(f"plugin {name!r} did not return a Provider named {name!r} with a pattern "
                                      f"among {PATTERNS}: it returned {got}", provider=name)
        built[name] = provider
    return built
