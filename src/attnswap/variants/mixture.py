"""A learnable mixture of candidate masks, hardened into one sparse mask (cf. https://arxiv.org/abs/2004.05150).

Each candidate k is a positional mask. For a query q and key kv the mixture weighs them,

    M(q, kv) = Σ_k w_k · 1[kv ∈ cand_k(q)],      p(kv | q) ∝ exp(score(q, kv)) · M(q, kv),

so the union of the candidates is the mask and ``log M`` is an additive score bias. Weights are per head
(``per=head``, an (H, K) table) or shared by the layer (``per=layer``, (1, K)), through a sigmoid or a softmax
of learnable logits that start equal.

Candidate names (``mixture:candidates=win4+win16+sink4``), positions counted in key slots:
  ``winN``     sliding window: q - kv < N (the query and the N-1 keys before it).
  ``sinkN``    the first N real tokens of the row (StreamingLLM's sinks).
  ``dilN_D``   dilated window of N keys: q - kv ∈ {0, D, 2D, ..., (N-1)·D}.
  ``strideN``  summary tokens: kv - first_real ≡ N-1 (mod N), the last token of every block of N.
               A query sees itself only if it is one of them.
  ``full``     every earlier token.
``globalN`` is not offered: global tokens at the start of a causal sequence are exactly ``sinkN``.

Default candidates (10), by this rule: sliding windows at every power of two from 4 to 256 (local context at
each scale), plus one candidate of each non-local shape -- ``sink4`` (sinks), ``dil64_4`` (a sparse view with the
reach of ``win256`` at a quarter of its keys) and ``stride16`` (summary tokens every 16).

Scale invariance: multiplying every w of a head by c leaves p unchanged, so a plain L1 on the weights only
shrinks all of them together and cannot tell useful candidates from useless ones. The penalty is therefore
on weights normalised by their largest, Σ_k w_k / max_k w_k: scale-free, ≥ 1, and = 1 iff one candidate is
left. Its gradient lowers every weight but the largest relative to the largest, which is what hardening
reads: ``harden(threshold)`` drops the candidates whose normalised weight is below ``threshold`` (a boolean
``kept`` buffer saved with the state); afterwards the mask is the union of the kept candidates only, per
head, so a trained mixture runs at the cost of the masks it kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.kernels.masks import MaskFn, and_masks, causal, draw, mask_bands, materialize, or_masks, to_index_mask
from attnswap.variants.base import AttnContext, check
from attnswap.variants.masked import MaskedVariant
from attnswap.variants.window import sliding_window_mask

DEFAULT_CANDIDATES = ("win4", "win8", "win16", "win32", "win64", "win128", "win256", "sink4", "dil64_4", "stride16")
CANDIDATE_FORMS = "winN (window), sinkN (first N tokens), dilN_D (N keys at dilation D), strideN (every N-th), full"
_CANDIDATE = re.compile(r"(win|sink|stride)(\d+)|dil(\d+)_(\d+)|full")
_TINY = torch.finfo(torch.float32).tiny  # log(M) of a zero-weight key: finite, so its gradient is 0, not NaN
DENSITY_BUDGET = 1 << 24  # mask entries `density` evaluates at once: tens of MB at any length


def parse_candidate(name: str) -> tuple[str, tuple[int, ...]]:
    """``"dil64_4"`` -> ``("dil", (64, 4))``; an unknown form or a zero size is a user error."""
    match = _CANDIDATE.fullmatch(name)
    if match is None:
        raise AttnswapError(f"unknown mixture candidate {name!r}; accepted forms: {CANDIDATE_FORMS}")
    if name == "full":
        return "full", ()
    kind = match.group(1) or "dil"
    sizes = tuple(int(g) for g in match.groups()[1:] if g is not None)
    if min(sizes) < 1:
        raise AttnswapError(f"mixture candidate {name!r} has a zero size; sizes must be >= 1")
    return kind, sizes


def _row(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]``, where a one-row table stands for every index (per-layer weights, an unpadded batch)."""
    return table[index % table.shape[0]]


def candidate_mask(name: str, first_real: torch.Tensor) -> MaskFn:
    """Positional mask of one candidate; ``first_real`` (B|1,) is each row's first real token."""
    kind, sizes = parse_candidate(name)
    if kind == "full":
        return causal
    if kind == "win":
        return sliding_window_mask(sizes[0], 0, first_real)
    if kind == "sink":
        (n,) = sizes

        def mask(b, h, q, kv):
            return (kv - _row(first_real, b)) < n
    elif kind == "dil":
        n, step = sizes

        def mask(b, h, q, kv):
            gap = q - kv
            return (gap % step == 0) & (gap < n * step)
    else:
        (n,) = sizes

        def mask(b, h, q, kv):
            return (kv - _row(first_real, b)) % n == n - 1

    mask.__name__ = name
    return mask


def union_mask(candidates: tuple[str, ...], kept: torch.Tensor, first_real: torch.Tensor) -> MaskFn:
    """Positional mask of the kept candidates: kv is visible to head h if some candidate with kept[h, k] holds it."""

    def gate(k: int) -> MaskFn:
        def is_kept(b, h, q, kv):
            return _row(kept, h)[..., k]

        is_kept.__name__ = f"kept{k}"
        return is_kept

    return or_masks(*(and_masks(gate(k), candidate_mask(name, first_real)) for k, name in enumerate(candidates)))


# --- learnable state ---------------------------------------------------------------------------
class MixtureState(nn.Module):
    """Mixture logits (H|1, K) and the ``kept`` buffer (H|1, K) of one attention layer."""

    def __init__(self, candidates: tuple[str, ...], rows: int, weights: str, init: float):
        super().__init__()
        self.candidates = candidates
        self.parametrisation = weights
        # Softmax logits that start equal give 1/K whatever their value; the sigmoid starts at `init`.
        start = math.log(init / (1 - init)) if weights == "sigmoid" else 0.0
        self.logits = nn.Parameter(torch.full((rows, len(candidates)), start))
        self.register_buffer("kept", torch.ones(rows, len(candidates), dtype=torch.bool))

    def weights(self) -> torch.Tensor:
        """(H|1, K) fp32 weights, exactly zero for dropped candidates."""
        if self.parametrisation == "softmax":
            return torch.softmax(self.logits.float().masked_fill(~self.kept, float("-inf")), dim=-1)
        return torch.sigmoid(self.logits.float()) * self.kept

    def normalised(self) -> torch.Tensor:
        """(H|1, K) weights over each row's largest: in [0, 1], 1 for the leading candidate."""
        w = self.weights()
        # max, not amax: amax splits the gradient between tied leaders, so two candidates that are the same
        # mask on the training lengths would stay tied for ever; max breaks the tie toward the earlier one.
        leader = w.max(dim=-1, keepdim=True).values
        return w / leader.clamp_min(_TINY)

    @torch.no_grad()
    def harden(self, threshold: float) -> None:
        """Drop, for good, the candidates whose normalised weight is below ``threshold`` (the leader always stays)."""
        check(0 < threshold <= 1, f"harden threshold must be in (0, 1], got {threshold}")
        self.kept &= self.normalised() >= threshold

    def extra_repr(self) -> str:
        return f"candidates={'+'.join(self.candidates)}, rows={self.kept.shape[0]}, weights={self.parametrisation}"


def density(state: MixtureState, n: int) -> torch.Tensor:
    """(H|1,) fraction of the causal n×n triangle the kept candidates allow, without padding.

    Evaluated a band of query rows at a time (about DENSITY_BUDGET mask entries), so memory stays bounded:
    the whole n×n at 8192 tokens and 32 heads would be 2 GB of booleans, plus int64 temporaries.
    """
    heads = state.kept.shape[0]
    device = state.kept.device
    pos = torch.arange(n, device=device)
    mask = union_mask(state.candidates, state.kept, torch.zeros(1, dtype=torch.long, device=device))
    index_mask = to_index_mask(mask, pos, pos, None)
    band = max(1, DENSITY_BUDGET // (heads * n))
    allowed = sum(rows.sum(dim=(0, 2, 3)) for rows in mask_bands(index_mask, 1, heads, n, n, device, band))
    return allowed.double() / (n * (n + 1) / 2)


def survivors(state: MixtureState, n: int | None = None) -> dict:
    """Which candidates each row (head, or the layer) keeps, their normalised weights, and the density at n tokens."""
    kept, norm = state.kept.tolist(), state.normalised().detach().tolist()
    result = {
        "candidates": list(state.candidates),
        "kept": [[c for c, keep in zip(state.candidates, row) if keep] for row in kept],
        "normalised": [[round(w, 4) for w in row] for row in norm],
    }
    if n is not None:
        result["density"] = [round(d, 4) for d in density(state, n).tolist()]
    return result


def _mixture_states(model: nn.Module) -> list[tuple[int, MixtureState]]:
    """(layer index, state) of every mixture state in a swapped model (or of a lone state, layer 0)."""
    if isinstance(model, MixtureState):
        return [(0, model)]
    found = []
    for module in model.modules():
        for child in module.children():
            if isinstance(child, MixtureState):
                found.append((getattr(module, "layer_idx", len(found)), child))
    if not found:
        raise AttnswapError("no mixture state found; swap a 'mixture' variant into the model first")
    return found


def harden(model: nn.Module, threshold: float) -> dict[int, dict]:
    """Harden every mixture state of a swapped model (or one state); returns ``report(model)``."""
    for _, state in _mixture_states(model):
        state.harden(threshold)
    return report(model)


def report(model: nn.Module, n: int | None = None) -> dict[int, dict]:
    """``survivors`` of every swapped layer, by layer index: for evaluation and the report."""
    return {layer: survivors(state, n) for layer, state in _mixture_states(model)}


# --- the variant -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixtureParams:
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    per: str = "head"  # one weight table per head, or one for the whole layer
    weights: str = "sigmoid"  # sigmoid or softmax of the logits
    init: float = 0.5  # initial sigmoid weight of every candidate (softmax weights start at 1/K)

    def __post_init__(self):
        check(len(self.candidates) > 0, f"mixture needs at least one candidate; accepted forms: {CANDIDATE_FORMS}")
        for name in self.candidates:
            parse_candidate(name)
        repeated = [c for c in self.candidates if self.candidates.count(c) > 1]
        if repeated:
            raise AttnswapError(f"mixture candidate {repeated[0]!r} is listed twice; list each once")
        check(self.per in ("head", "layer"), f"mixture per must be head or layer, got per={self.per!r}")
        check(self.weights in ("sigmoid", "softmax"),
              f"mixture weights must be sigmoid or softmax, got weights={self.weights!r}")
        check(0 < self.init < 1, f"mixture init must be in (0, 1), got init={self.init}")


class Mixture(MaskedVariant):
    name = "mixture"
    Params = MixtureParams
    summary = "learnable weighted mixture of candidate masks, hardened into one block-sparse mask"
    # Its reference and score bias build their own candidate masks over one row of positions: the model's mask
    # (sliding window, packed documents, a 4-D mask) is refused rather than half-applied.
    honours_model_mask = False

    @property
    def label(self) -> str:
        suffix = "_softmax" if self.params.weights == "softmax" else ""
        return f"mixture_k{len(self.params.candidates)}_{self.params.per}{suffix}"

    def make_state(self, num_heads: int, head_dim: int) -> MixtureState:
        rows = num_heads if self.params.per == "head" else 1
        return MixtureState(self.params.candidates, rows, self.params.weights, self.params.init)

    def l1_penalty(self, state: MixtureState) -> torch.Tensor:
        """Mean over rows of Σ_k w_k / max_k w_k: ≥ 1, and 1 when a single candidate is left."""
        return state.normalised().sum(dim=-1).mean()

    def _state(self, state: MixtureState | None) -> MixtureState:
        assert isinstance(state, MixtureState), "mixture needs its make_state() state (swap puts it on the module)"
        assert state.candidates == self.params.candidates, f"state has {state.candidates}, not {self.params.candidates}"
        return state

    def positional_mask(self, ctx: AttnContext, batch: int, device, state) -> MaskFn:
        state = self._state(state)
        return union_mask(state.candidates, state.kept, ctx.first_real_token(batch, device))

    def score_bias(self, state, ctx: AttnContext, q_pos, kv_pos) -> MaskFn:
        state = self._state(state)
        weights = state.weights()  # (H|1, K), captured: the kernel carries its gradient to the logits
        # One row of first tokens stands for every row when nothing is padded (see _row).
        first_real = ctx.first_real_token(1, q_pos.device)
        masks = [candidate_mask(name, first_real) for name in state.candidates]

        def log_mixture(b, h, q_idx, kv_idx):
            qp, kp = q_pos[q_idx], kv_pos[kv_idx]
            w = _row(weights, h)  # (..., K)
            total = sum(torch.where(mask(b, h, qp, kp), w[..., k], 0.0) for k, mask in enumerate(masks))
            return torch.log(total.clamp_min(_TINY))

        return log_mixture

    def probs(self, q, k, ctx: AttnContext, state) -> torch.Tensor:
        """p ∝ exp(score)·M straight from the definition, (B, H, T, S) fp32 -- independent of the log-bias path."""
        state = self._state(state)
        batch, _, q_len, _ = q.shape
        kv_len = k.shape[-2]
        q_pos, kv_pos = ctx.positions(q_len, kv_len, q.device)
        first_real = ctx.first_real_token(batch, q.device)
        weights = state.weights()  # (H|1, K)
        mix = 0.0
        for j, name in enumerate(state.candidates):
            index_mask = to_index_mask(candidate_mask(name, first_real), q_pos, kv_pos, ctx.key_valid)
            member = materialize(index_mask, batch, 1, q_len, kv_len, q.device)  # (B, 1, T, S)
            mix = mix + member * weights[:, j].view(1, -1, 1, 1)  # (B, H|1, T, S)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * ctx.scaling  # (B, H, T, S)
        scores = scores.masked_fill(mix == 0, float("-inf"))
        shift = scores.amax(dim=-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0).detach()  # a row that sees nothing stays all zeros
        unnormalised = torch.exp(scores - shift) * mix
        return unnormalised / unnormalised.sum(dim=-1, keepdim=True).clamp_min(_TINY)


# --- hardening by attention mass (attnswap harden) ---------------------------------------------
def mixture_state(state: object) -> MixtureState | None:
    """``state`` where it is a mixture's, else None: a layer the mixture does not hold."""
    return state if isinstance(state, MixtureState) else None


@torch.no_grad()
def candidate_mass(variant: Mixture, state: MixtureState, q, k, ctx: AttnContext) -> torch.Tensor:
    """(H|1, K) fp64: per head (or for the layer, averaged over heads), the attention mass each candidate carries,
    averaged over the batch's queries. q (B, H, T, D), k (B, H, S, D); a row sums to 1 where every query sees a key.
    """
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[-2]
    probs = variant.probs(q, k, ctx, state)  # (B, H, T, S)
    q_pos, kv_pos = ctx.positions(q_len, kv_len, q.device)
    first_real = ctx.first_real_token(batch, q.device)
    weights = state.weights()  # (H|1, K)
    shares = [materialize(to_index_mask(candidate_mask(name, first_real), q_pos, kv_pos, ctx.key_valid),
                          batch, 1, q_len, kv_len, q.device) * weights[:, j].view(1, -1, 1, 1)
              for j, name in enumerate(state.candidates)]  # each (B, H|1, T, S): w_k where cand_k holds kv
    mix = sum(shares).clamp_min(torch.finfo(torch.float32).tiny)
    mass = torch.stack([(probs * share / mix).sum(dim=-1).mean(dim=(0, 2)) for share in shares], dim=-1)  # (H, K)
    return mass.double().mean(dim=0, keepdim=True) if weights.shape[0] == 1 else mass.double()


def kept_by_mass(mass: torch.Tensor, coverage: float) -> torch.Tensor:
    """(rows, K) bool: per row, the fewest candidates, heaviest first, whose mass reaches ``coverage`` of the row's."""
    order = torch.argsort(mass, dim=-1, descending=True, stable=True)
    ranked = mass.gather(-1, order)
    before = ranked.cumsum(dim=-1) - ranked  # mass of the heavier candidates
    needed = before < coverage * mass.sum(dim=-1, keepdim=True) - 1e-12
    needed[..., 0] = True  # a head keeps at least its heaviest candidate
    return torch.zeros_like(needed).scatter(-1, order, needed)



def main() -> None:
    candidates = ("win3", "sink2", "dil3_3", "stride4")
    pos = torch.arange(12)
    first_real = torch.zeros(1, dtype=torch.long)

    def grid(mask: MaskFn) -> list[str]:
        return draw(materialize(to_index_mask(mask, pos, pos, None), 1, 1, 12, 12, "cpu")[0, 0]).splitlines()

    state = Mixture(MixtureParams(candidates=candidates)).make_state(num_heads=1, head_dim=8)
    with torch.no_grad():
        state.logits[0, 2:] = -20.0  # as if training had made dil3_3 and stride4 useless
    harden(state, 0.1)
    grids = [grid(candidate_mask(name, first_real)) for name in candidates]
    grids.append(grid(union_mask(candidates, state.kept, first_real)))
    print("   ".join(f"{name:<12}" for name in (*candidates, "hardened")))
    for rows in zip(*grids):
        print("   ".join(rows))


if __name__ == "__main__":
    main()
