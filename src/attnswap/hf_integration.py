"""Folders written by attnswap load with their variant through plain transformers, or fail loudly.

``attnswap.save`` writes a ``config.json`` of ``model_type: "attnswap"`` that holds the original model's config
(``base_config``) and the swap (``attnswap``), plus ``attnswap_auto.py``, named by the config's ``auto_map``.
So the folder loads with its variant active through

- ``AutoModelForCausalLM.from_pretrained(dir)`` (and ``pipeline("text-generation", model=dir)``) once
  ``import attnswap`` has registered the ``attnswap`` model type here;
- ``from_pretrained(dir, trust_remote_code=True)`` and ``lm_eval --model hf --model_args
  pretrained=dir,trust_remote_code=True`` without that import: transformers runs ``attnswap_auto.py``, which
  imports attnswap;

and any other way (no import, no trust_remote_code) transformers refuses the unknown model type, instead of
running the original model's attention under the distilled weights. ``AttnswapForCausalLM`` is a loader, not a
module: its ``from_pretrained`` returns the original architecture's model with the variant swapped in.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

MODEL_TYPE = "attnswap"
AUTO_MODULE = "attnswap_auto"  # the modelling file written beside the weights, for trust_remote_code
AUTO_MAP = {"AutoConfig": f"{AUTO_MODULE}.AttnswapConfig", "AutoModelForCausalLM": f"{AUTO_MODULE}.AttnswapForCausalLM"}
AUTO_SOURCE = '''"""Written by attnswap.save: loads this folder with its attention variant (needs `pip install attnswap`)."""

from attnswap.hf_integration import AttnswapConfig, AttnswapForCausalLM  # noqa: F401
'''


class AttnswapConfig(PretrainedConfig):
    """A saved swap: the original model's config as a dict (``base_config``) and the swap (``attnswap``)."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, attnswap: dict | None = None, **kwargs):
        self.base_config = base_config or {}
        self.attnswap = attnswap or {}
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        """The original model's config object."""
        fields = dict(self.base_config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)


class AttnswapForCausalLM:
    """``AutoModelForCausalLM`` entry for ``model_type: attnswap``: the original model with its variant."""

    config_class = AttnswapConfig

    @classmethod
    def from_pretrained(cls, directory, *model_args, config: AttnswapConfig | None = None, **kwargs):
        from attnswap.surgery import load_swapped

        for hub_only in ("trust_remote_code", "code_revision", "_commit_hash", "adapter_kwargs"):
            kwargs.pop(hub_only, None)
        return load_swapped(Path(directory), config or AttnswapConfig.from_pretrained(directory), **kwargs)


def saved_config(model_config: PretrainedConfig, swap_info: dict) -> dict:
    """The config.json of a saved swap, from the swapped model's own config."""
    base = model_config.to_dict()
    base.pop("attnswap", None)
    base.pop("auto_map", None)
    return {"model_type": MODEL_TYPE, "architectures": ["AttnswapForCausalLM"], "auto_map": dict(AUTO_MAP),
            "attnswap": swap_info, "base_config": base, "transformers_version": base.get("transformers_version")}


def write_auto_module(directory: Path) -> None:
    (directory / f"{AUTO_MODULE}.py").write_text(AUTO_SOURCE)


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, AttnswapConfig, exist_ok=True)
    AutoModelForCausalLM.register(AttnswapConfig, AttnswapForCausalLM, exist_ok=True)


_register()


# --- other heads on a saved swap's checkpoint ---------------------------------------------------
class _AttnswapHeadLoader:
    """``Auto<head>.from_pretrained(saved_swap)`` for the heads a user puts on a causal LM's checkpoint: the
    original architecture's class for that head, loaded through its own ``from_pretrained`` (never the Auto
    dispatch again), with the saved swap and its variant tensors."""

    config_class = AttnswapConfig
    auto_class: str  # the transformers Auto class whose mapping names the head for the base config

    @classmethod
    def from_pretrained(cls, directory, *model_args, config: AttnswapConfig | None = None, **kwargs):
        import transformers

        from attnswap.surgery import IMPL_NAME, load_variant_tensors, swap

        config = config or AttnswapConfig.from_pretrained(directory)
        base = config.base()
        # The Auto class hands config overrides (num_labels=42) to AttnswapConfig, whose labels are otherwise the
        # default ones (a saved swap keeps its labels in base_config): a change there is the caller's.
        if config.id2label != PretrainedConfig().id2label:
            base.id2label, base.label2id = dict(config.id2label), dict(config.label2id)
        if config.problem_type is not None:
            base.problem_type = config.problem_type
        for name in [k for k in kwargs if k in base.to_dict() or k in ("num_labels", "id2label", "label2id")]:
            setattr(base, name, kwargs.pop(name))  # overrides passed beside an explicit config
        for hub_only in ("trust_remote_code", "code_revision", "_commit_hash", "adapter_kwargs", "_from_auto"):
            kwargs.pop(hub_only, None)
        if kwargs.get("attn_implementation") in (None, IMPL_NAME):  # swap() sets ours after loading
            kwargs["attn_implementation"] = config.attnswap.get("original_attn_implementation", "sdpa")
        head = getattr(transformers, cls.auto_class)._model_mapping[type(base)]
        model = head.from_pretrained(str(directory), *model_args, config=base, **kwargs)
        swap(model, config.attnswap["variant"], layers=config.attnswap["layers"])
        load_variant_tensors(model, Path(directory))
        return model.eval()


HEAD_AUTO_CLASSES = ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                     "AutoModelForQuestionAnswering")


def _register_heads() -> None:
    import transformers

    for auto_class in HEAD_AUTO_CLASSES:
        loader = type(f"Attnswap{auto_class.removeprefix('AutoModel') or 'Model'}Loader", (_AttnswapHeadLoader,),
                      {"auto_class": auto_class, "__module__": __name__})
        getattr(transformers, auto_class).register(AttnswapConfig, loader, exist_ok=True)


_register_heads()
