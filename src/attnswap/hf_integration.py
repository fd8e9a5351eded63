"""Folders written by attnswap load with their variant through plain transformers, or fail loudly.

``attnswap.save`` writes a ``config.json`` of ``model_type: "attnswap"`` that holds the original model's config
(``base_config``) and the swap (``attnswap``), plus ``attnswap_auto.py``, named by the config's ``auto_map``.
So the folder loads with its variant active through

- ``AutoModelForCausalLM.from_pretrained(dir)`` (and ``pipeline("text-generation", model=dir)``), or any other head
  in ``HEADS`` (``AutoModelForSequenceClassification`` …), once ``import attnswap`` has registered the ``attnswap``
  model type here;
- ``from_pretrained(dir, trust_remote_code=True)`` and ``lm_eval --model hf --model_args
  pretrained=dir,trust_remote_code=True`` without that import: transformers runs ``attnswap_auto.py``, which
  imports attnswap.

The original model's concrete class (``LlamaForCausalLM.from_pretrained(dir)``) reads ``base_config``, which names
``attn_implementation: "attnswap"``: without ``import attnswap`` transformers refuses that name; with it, the first
forward of a layer that carries no variant raises an AttnswapError saying how to load the folder. Neither runs the
original attention under the distilled weights.

The loaders never re-enter the Auto dispatch: each resolves the original architecture's class for its head from the
base config and calls that class's own ``from_pretrained`` with the caller's public arguments only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification, PretrainedConfig)

MODEL_TYPE = "attnswap"
IMPL_NAME = "attnswap"  # the name attnswap's attention is registered under (surgery.IMPL_NAME)
AUTO_MODULE = "attnswap_auto"  # the modelling file written beside the weights, for trust_remote_code
# The heads a causal LM's checkpoint is loaded into: the Auto class and the name of attnswap's loader for it.
HEADS = {
    AutoModelForCausalLM: "AttnswapForCausalLM",
    AutoModel: "AttnswapModel",
    AutoModelForSequenceClassification: "AttnswapForSequenceClassification",
    AutoModelForTokenClassification: "AttnswapForTokenClassification",
    AutoModelForQuestionAnswering: "AttnswapForQuestionAnswering",
}
AUTO_MAP = {"AutoConfig": f"{AUTO_MODULE}.AttnswapConfig",
            **{auto.__name__: f"{AUTO_MODULE}.{loader}" for auto, loader in HEADS.items()}}
AUTO_SOURCE = f'''"""Written by attnswap.save: loads this folder with its attention variant (needs `pip install attnswap`)."""

from attnswap.hf_integration import AttnswapConfig, {", ".join(HEADS.values())}  # noqa: F401
'''
# Arguments of transformers' own loading machinery, not the caller's: never passed on to the base class.
_HUB_ONLY = ("trust_remote_code", "code_revision", "adapter_kwargs")


class AttnswapConfig(PretrainedConfig):
    """A saved swap: the original model's config as a dict (``base_config``) and the swap (``attnswap``).

    Config arguments a caller passes to ``from_pretrained`` (``num_labels=3``, ``attn_implementation=…``) reach this
    wrapper first; they are kept in ``base_overrides`` and applied to the original model's config by ``base()``.
    """

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, attnswap: dict | None = None, **kwargs):
        self.base_config = base_config or {}
        self.attnswap = attnswap or {}
        self.base_overrides: dict = {}
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        wants_unused = kwargs.pop("return_unused_kwargs", False)
        given = {key: value for key, value in kwargs.items() if not key.startswith("_") and key != "name_or_path"}
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        config.base_overrides = {key: value for key, value in given.items() if key not in unused}
        return (config, unused) if wants_unused else config

    def base(self) -> PretrainedConfig:
        """The original model's config object, with the caller's config arguments applied."""
        fields = {**self.base_config, **self.base_overrides}
        fields.pop("attn_implementation", None)  # the loader picks the implementation the swap runs beside
        return AutoConfig.for_model(fields.pop("model_type"), **fields)


class _SwapLoader:
    """``from_pretrained`` of one Auto head for ``model_type: attnswap``: the original model with its variant.

    A loader, not a module: it returns the original architecture's model (e.g. ``LlamaForCausalLM``) with the variant
    swapped in."""

    config_class = AttnswapConfig
    auto_class: ClassVar[type] = AutoModelForCausalLM

    @classmethod
    def from_pretrained(cls, directory, *model_args, config: AttnswapConfig | None = None, **kwargs):
        from attnswap.surgery import load_swapped

        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes the folder and keyword arguments only")
        for hub_only in _HUB_ONLY:
            kwargs.pop(hub_only, None)
        public = {key: value for key, value in kwargs.items() if not key.startswith("_")}
        if config is None:
            config, public = AttnswapConfig.from_pretrained(directory, return_unused_kwargs=True, **public)
        return load_swapped(Path(directory), config, auto_class=cls.auto_class, **public)


def _loader(auto_class: type, name: str) -> type:
    return type(name, (_SwapLoader,), {"auto_class": auto_class, "__doc__": f"{auto_class.__name__} for a saved swap."})


AttnswapForCausalLM = _loader(AutoModelForCausalLM, HEADS[AutoModelForCausalLM])
AttnswapModel = _loader(AutoModel, HEADS[AutoModel])
AttnswapForSequenceClassification = _loader(AutoModelForSequenceClassification,
                                            HEADS[AutoModelForSequenceClassification])
AttnswapForTokenClassification = _loader(AutoModelForTokenClassification, HEADS[AutoModelForTokenClassification])
AttnswapForQuestionAnswering = _loader(AutoModelForQuestionAnswering, HEADS[AutoModelForQuestionAnswering])
_LOADERS = {auto: globals()[name] for auto, name in HEADS.items()}


def head_class(auto_class: type, base_config: PretrainedConfig) -> type:
    """The original architecture's class for ``auto_class`` (e.g. LlamaForSequenceClassification), without
    calling ``auto_class.from_pretrained``, which would dispatch back to attnswap's loader."""
    from attnswap.errors import AttnswapError

    try:
        return auto_class._model_mapping[type(base_config)]
    except KeyError:
        raise AttnswapError(f"{auto_class.__name__} has no class for model type {base_config.model_type!r}; "
                            "load this swap with a head that model type has (e.g. AutoModelForCausalLM)") from None


def saved_config(model_config: PretrainedConfig, swap_info: dict) -> dict:
    """The config.json of a saved swap, from the swapped model's own config.

    ``base_config`` names attnswap's attention and carries the swap, so the original model's concrete class, which
    reads ``base_config`` when it finds its own model type there, cannot run the original attention silently."""
    base = model_config.to_dict()
    base.pop("auto_map", None)
    base["attnswap"] = swap_info
    base["attn_implementation"] = IMPL_NAME
    return {"model_type": MODEL_TYPE, "architectures": [HEADS[AutoModelForCausalLM]], "auto_map": dict(AUTO_MAP),
            "attnswap": swap_info, "base_config": base, "transformers_version": base.get("transformers_version")}


def write_auto_module(directory: Path) -> None:
    (directory / f"{AUTO_MODULE}.py").write_text(AUTO_SOURCE)


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, AttnswapConfig, exist_ok=True)
    for auto_class, loader in _LOADERS.items():
        auto_class.register(AttnswapConfig, loader, exist_ok=True)


_register()
