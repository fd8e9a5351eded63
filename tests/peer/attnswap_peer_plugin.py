"""pytest plugin: every transformers model a test builds gets its self-attention swapped to ``full`` before use.

Enable it with ``-p attnswap_peer_plugin`` (this folder on PYTHONPATH); ``scripts/peer_tests`` runs transformers' own
model tests with and without it. The swap happens at the end of the outermost model's construction (its
``post_init``), so ``Model(config)``, ``from_config`` and ``from_pretrained`` all hand the test a swapped model, and
a model built inside another one (``GPT2LMHeadModel.transformer``) is swapped once, as part of the outer one. A model
that ``attnswap.swap`` refuses (no self-attention it recognises) stays as built and is counted as refused.

Each test's report carries two user properties, ``attnswap_swapped`` and ``attnswap_refused``: how many models it
built were swapped and how many were left alone, so a test that passes swapped without exercising a swap shows it.
"""

from __future__ import annotations

import functools
import os
import threading

import pytest

VARIANT = os.environ.get("ATTNSWAP_PEER_VARIANT", "full")

_state = threading.local()  # the models under construction (outermost first), and this test's counts


def _under_construction() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def _count(key: str) -> None:
    counts = getattr(_state, "counts", None)
    if counts is not None:
        counts[key] += 1


def _swap_if_outermost(model) -> None:
    import attnswap
    from attnswap.errors import AttnswapError

    stack = _under_construction()
    if model in stack:
        stack.remove(model)
    if any(other is not model for other in stack) or getattr(model, "attnswap_record", None) is not None:
        return  # part of a model still being built: swapped with it
    try:
        attnswap.swap(model, VARIANT, trainable="all")  # tests train and check gradients: keep every weight trainable
    except (AttnswapError, AssertionError):
        _count("refused")
    else:
        _count("swapped")


def install() -> None:
    """Wrap ``PreTrainedModel.__init__`` and ``post_init`` (idempotent)."""
    from transformers import PreTrainedModel

    if getattr(PreTrainedModel, "_attnswap_peer_installed", False):
        return
    original_init, original_post_init = PreTrainedModel.__init__, PreTrainedModel.post_init

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        _under_construction().append(self)
        original_init(self, *args, **kwargs)

    @functools.wraps(original_post_init)
    def post_init(self, *args, **kwargs):
        result = original_post_init(self, *args, **kwargs)
        _swap_if_outermost(self)
        return result

    PreTrainedModel.__init__, PreTrainedModel.post_init = __init__, post_init
    PreTrainedModel._attnswap_peer_installed = True


def pytest_configure(config):
    install()


def pytest_report_header(config):
    return f"attnswap peer plugin: every model's self-attention swapped to {VARIANT!r}"


def pytest_runtest_setup(item):
    _state.counts = {"swapped": 0, "refused": 0}
    _under_construction().clear()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    counts = getattr(_state, "counts", None) or {"swapped": 0, "refused": 0}
    item.user_properties[:] = [(k, v) for k, v in item.user_properties if not k.startswith("attnswap_")]
    item.user_properties += [("attnswap_swapped", counts["swapped"]), ("attnswap_refused", counts["refused"])]
