"""Named convert presets (which modules to make Bayesian, and how).

The presets themselves live with the integrations that know model layouts (``bayeslayers.integrations``);
they reach this registry through the ``bayeslayers.presets`` entry-point group (or :func:`register_preset`),
so the core never imports an integration.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .config import BayesConfig

_PRESETS: dict[str, BayesConfig] = {}
_ENTRY_POINT_GROUP = "bayeslayers.presets"
_loaded_entry_points = False


def _as_config(name: str, options) -> BayesConfig:
    if isinstance(options, BayesConfig):
        return options
    if not isinstance(options, dict):
        raise TypeError(f"preset {name!r} must be a BayesConfig or a dict of its options, got {type(options).__name__}")
    return BayesConfig(**options)


def register_preset(name: str, options) -> None:
    """Registers a :class:`BayesConfig` (or a dict of its options) under ``name``."""
    _PRESETS[name] = _as_config(name, options)


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for entry_point in entry_points(group=_ENTRY_POINT_GROUP):
        if entry_point.name not in _PRESETS:
            _PRESETS[entry_point.name] = _as_config(entry_point.name, entry_point.load())


def available_presets() -> list[str]:
    _load_entry_points()
    return sorted(_PRESETS)


def get_preset(name: str) -> BayesConfig:
    """The :class:`BayesConfig` of preset ``name``; a ValueError lists the known presets otherwise."""
    _load_entry_points()
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(_PRESETS)}")
    return _PRESETS[name]
