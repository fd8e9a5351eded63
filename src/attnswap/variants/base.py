"""What every attention variant shares: parameters from a spec string, the call context, the two paths.

A variant is a frozen dataclass of hyperparameters plus two ways to compute attention:
``reference`` (dense fp32, slow, obviously right: the test oracle) and ``attend`` (the efficient path).
Both take HF's boundary layout, q (B, H, T, D) and k/v (B, H, S, D) with GQA already expanded,
and return (B, H, T, D).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.kernels.decode import DecodeStep
from attnswap.kernels.kv_cache import KeptState
from attnswap.kernels.masks import MaskFn, device_arange, device_constant


@dataclass
class AttnContext:
    """Everything about one attention call that is not q, k or v.

    ``key_valid`` (B, S) is True for real tokens and False for padding; None means no padding.
    Queries are the last T of the S key slots (HF's dynamic cache), unless ``q_positions`` (T,) gives the
    queries' positions (a StaticCache, whose S slots are preallocated; or a rolling cache, where ``kv_positions``
    (S,) also gives each key slot's). Packed sequences give both per row, (B, T) and (B, S): each token's position
    in its own document.

    ``model_mask(b, h, q_idx, kv_idx)`` is what the model itself allows beyond causality and padding (transformers'
    mask: the config's sliding window, packed documents, a 4-D mask), None when it adds nothing; a variant ANDs
    it with its own pattern. ``dense_mask`` is a caller's 4-D mask as given (bool, or float added to the scores),
    which ``full`` hands to SDPA unchanged.

    ``documents`` (B, T), for a variant that honours packed documents but no other model mask: each slot's document
    index in its row, non-decreasing, queries and keys the same T slots; a token attends within its own document
    only. It is set beside a model mask found to say exactly that (hf.masks.packed_documents), whose positions
    (``q_positions``, ``kv_positions``: each token's position in its document) stay for an exact window part; the
    keys are still in slot order.
    """

    scaling: float
    key_valid: torch.Tensor | None = None
    layer_idx: int = 0
    q_positions: torch.Tensor | None = None
    kv_positions: torch.Tensor | None = None
    # A rolling cache may hold fewer slots than there were tokens; sinks still need the first real one.
    first_real: torch.Tensor | None = None
    model_mask: MaskFn | None = None
    dense_mask: torch.Tensor | None = None
    documents: torch.Tensor | None = None

    def positions(self, q_len: int, kv_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions (T,), (S,) of queries and keys."""
        kv_pos = self.kv_positions if self.kv_positions is not None else device_arange(0, kv_len, device)
        q_pos = self.q_positions if self.q_positions is not None else device_arange(kv_len - q_len, kv_len, device)
        return q_pos, kv_pos

    def position_maps(self, q_len: int, kv_len: int) -> tuple[torch.Tensor | int, torch.Tensor | int]:
        """``positions``, except that slots in order are an int offset: what ``to_index_mask`` takes."""
        return (kv_len - q_len if self.q_positions is None else self.q_positions,
                0 if self.kv_positions is None else self.kv_positions)

    @property
    def slots_out_of_order(self) -> bool:
        """Whether positions place queries or keys other than in slot order (a StaticCache, a rolling cache); packed
        documents' positions restart per document, but their slots stay in order."""
        return self.documents is None and (self.q_positions is not None or self.kv_positions is not None)

    def first_real_token(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) absolute position of each row's first non-padding token (0 without padding)."""
        if self.first_real is not None:
            return self.first_real
        if self.key_valid is None:
            return device_constant(0, device).expand(batch)
        return self.key_valid.long().argmax(dim=-1)


class Variant:
    """Base class; subclasses set ``name``, ``Params`` and implement ``reference`` (and usually ``attend``)."""

    name: ClassVar[str]
    Params: ClassVar[type]
    summary: ClassVar[str] = ""
    # What attend() and reference() read beyond the plain case, declared so that the attention function can refuse
    # a call a variant would get silently wrong: ``ctx.model_mask`` (the model's own sliding window, packed
    # documents, a 4-D mask), and ``ctx.q_positions`` with keys in slot order (a StaticCache: queries are not the
    # last T slots).
    honours_model_mask: ClassVar[bool] = False
    honours_query_positions: ClassVar[bool] = False
    # ``ctx.documents``: sequences packed into rows, where the model's mask says no more than that.
    honours_packed_documents: ClassVar[bool] = False
    # Whether the variant routes each head between full attention and a cheap pattern (planned per head once trained).
    routes_heads: ClassVar[bool] = False
    # ``ctx.dense_mask`` as a float 4-D mask added to the scores, any finite bias included, as SDPA adds it.
    honours_score_bias: ClassVar[bool] = False

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise AttnswapError(f"variant '{self.name}' takes {self.Params.__name__}, got {type(self.params).__name__}")

    # --- naming ---------------------------------------------------------------------------------
    @functools.cached_property  # params are frozen; the spec keys the block-mask cache on every call
    def spec(self) -> str:
        """Round-trippable spec string, e.g. ``window:w=64,sinks=4``. A parameter added after specs were first saved
        (declared with ``OPTIONAL``) is left out at its default, so the specs of earlier runs stay what they were."""
        fields = [f"{f.name}={_format_value(getattr(self.params, f.name))}" for f in dataclasses.fields(self.params)
                  if not (f.metadata.get("optional") and getattr(self.params, f.name) == f.default)]
        return self.name + (":" + ",".join(fields) if fields else "")

    @property
    def label(self) -> str:
        """Short name with parameters for plots and logs, e.g. ``window64_sinks4``."""
        return self.name

    def __repr__(self) -> str:
        return f"<variant {self.spec}>"

    def check_layers(self, n_layers: int) -> None:
        """Refuse (AttnswapError) a model this variant cannot serve as specified: a spec naming layers it lacks."""

    # --- learnable state ------------------------------------------------------------------------
    def make_state(self, num_heads: int, head_dim: int) -> nn.Module | None:
        """Learnable parameters for one attention layer (None for parameter-free variants)."""
        return None

    def l1_penalty(self, state: nn.Module | None) -> torch.Tensor | None:
        """Sparsity penalty on mixture weights; None where a variant has none."""
        return None

    # --- cost: what the cost model and the benchmarks read --------------------------------------
    def cost(self, n: int, measure: str, state: nn.Module | None, heads: int, head_dim: int,
             layer: int = 0) -> torch.Tensor:
        """(H,) float64: each head's attention cost at context ``n`` as a fraction of full causal attention's.
        ``measure``: "flops" (attention FLOPs) or "kv" (memory a generation keeps after n tokens). ``state``: the
        variant's state on the CPU (a fresh one where nothing was learned); ``layer`` for patterns that vary by layer.
        """
        raise AttnswapError(f"no cost model for variant '{self.name}'; it covers masked variants, linear attention, "
                            "hybrid and nsa")

    def call_flops(self, q, k, ctx: "AttnContext", state: nn.Module | None, block: int,
                   run) -> tuple[float | None, str, float | None]:
        """(forward FLOPs of one ``attend`` call on q, k, how they were counted, fraction of allowed (query, key)
        pairs or None). ``run(None)`` makes that call. Default: not counted (the timing stands alone)."""
        return None, "not counted", None

    # --- computation ----------------------------------------------------------------------------
    def probs(self, q, k, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        """The attention matrix the variant implies, (B, H, T, S) fp32: materialises T×S, for tests and evaluation."""
        raise NotImplementedError(f"variant '{self.name}' defines no implied attention matrix")

    def reference(self, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        """Dense fp32 oracle, (B, H, T, D): the implied attention matrix times v."""
        return torch.matmul(self.probs(q, k, ctx, state), v.float())

    def attend(self, q, k, v, ctx: AttnContext, state: nn.Module | None) -> torch.Tensor:
        """The efficient path; defaults to the reference for variants that have no faster one."""
        return self.reference(q, k, v, ctx, state).to(q.dtype)

    # --- generation over a bounded cache ----------------------------------------------------------
    def kept_state(self, layer_idx: int, state: nn.Module | None = None) -> KeptState | None:
        """What layer ``layer_idx`` (with its ``state``) keeps between decode steps (attnswap.hf.cache builds its
        cache layer from it); None where what it attends over grows with the sequence."""
        return None

    def routes(self) -> tuple["Variant", "Variant"]:
        """A routed layer's two variants, (that of its full heads, that of its cheap heads), which its cache layer
        runs each over the keys it keeps for them: for a ``kept_state`` that names ``full_heads``."""
        raise AttnswapError(f"variant {self.spec!r} routes no heads")

    def decode(self, q: torch.Tensor, step: DecodeStep, state: nn.Module | None) -> torch.Tensor:
        """One new token's attention, q (B, H, 1, D) -> (B, H, 1, D), over what its cache layer keeps (``step``),
        folding the new keys into a running state in place: static shapes, no host sync."""
        raise AttnswapError(f"variant {self.spec!r} has no decode step over a bounded cache; generate with the "
                            "default cache instead")


# --- spec strings -------------------------------------------------------------------------------
def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(_format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


SPEC_INT_LIMIT = 2**31 - 1  # kernels index tokens and features in 32 bits


def _coerce(variant: str, key: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            (item_kind, *_rest) = typing.get_args(kind)
            items = tuple(_coerce(variant, key, part, item_kind) for part in raw.split("+") if part)
            repeated = sorted({item for item in items if items.count(item) > 1})
            if repeated:
                raise AttnswapError(f"variant '{variant}': {key}={raw} names {repeated[0]} twice; name each once")
            return items
        if kind is bool:
            if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            return raw.lower() in {"true", "1", "yes"}
        value = kind(raw)
        if kind is int and not -SPEC_INT_LIMIT <= value <= SPEC_INT_LIMIT:
            raise AttnswapError(f"variant '{variant}': parameter {key}={raw[:30]} is out of range; give a value in "
                                f"-{SPEC_INT_LIMIT}..{SPEC_INT_LIMIT}")
        return value
    except AttnswapError:
        raise
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise AttnswapError(f"variant '{variant}': parameter {key}={raw[:40]!r} is not a valid {name}") from None


def parse_params(variant: str, params_cls: type, text: str) -> Any:
    """``"w=64,sinks=4"`` -> ``params_cls(w=64, sinks=4)``, refusing unknown keys and bad types."""
    hints = typing.get_type_hints(params_cls)
    known = [f.name for f in dataclasses.fields(params_cls)]
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise AttnswapError(f"variant '{variant}': expected key=value, got {item!r}")
        if key not in known:
            raise AttnswapError(f"variant '{variant}' has no parameter '{key}'; it takes: {', '.join(known) or 'none'}")
        if key in values:
            raise AttnswapError(f"variant '{variant}': parameter '{key}' is given twice; give it once")
        values[key] = _coerce(variant, key, raw.strip(), hints[key])
    return params_cls(**values)


OPTIONAL = {"optional": True}  # dataclasses.field metadata of a parameter that ``spec`` omits at its default


def check(condition: bool, message: str) -> None:
    """Parameter validation for ``__post_init__``: raise the one-line user error."""
    if not condition:
        raise AttnswapError(message)
