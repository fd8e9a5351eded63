"""The variant registry: a flat list of classes, looked up by name or by spec string."""

from __future__ import annotations

from attnswap.errors import AttnswapError
from attnswap.variants.base import AttnContext, Variant, parse_params
from attnswap.variants.duo import Duo
from attnswap.variants.full import Full
from attnswap.variants.hedgehog import Hedgehog
from attnswap.variants.hybrid import Hybrid
from attnswap.variants.longformer import Longformer
from attnswap.variants.mixture import Mixture
from attnswap.variants.nsa import NSA
from attnswap.variants.performer import Performer
from attnswap.variants.window import Window

VARIANTS: dict[str, type[Variant]] = {cls.name: cls for cls in (Full, Window, Longformer, Mixture, Performer, Hedgehog, NSA,
                                                                  Duo, Hybrid)}


def register(cls: type[Variant]) -> type[Variant]:
    """Add a variant class to the registry (usable as a decorator by plug-ins)."""
    VARIANTS[cls.name] = cls
    return cls


def get_variant(spec: "str | Variant") -> Variant:
    """``"window:w=64,sinks=4"`` (or a Variant instance) -> a Variant instance."""
    if isinstance(spec, Variant):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise AttnswapError(f"variant spec must be a non-empty string like 'window:w=64', got {spec!r}")
    name, _, params = spec.strip().partition(":")
    if name not in VARIANTS:
        raise AttnswapError(f"unknown variant '{name}'; choose from: {', '.join(sorted(VARIANTS))}")
    cls = VARIANTS[name]
    return cls(parse_params(name, cls.Params, params))


__all__ = ["VARIANTS", "AttnContext", "Variant", "get_variant", "register"]
