"""Save a swapped model and load it back: folders written by attnswap load with their variant through plain transformers, or fail loudly.

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

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification, PretrainedConfig)

from attnswap.errors import AttnswapError
from attnswap.hf.attention import IMPL_NAME, STATE_ATTR
from attnswap.hf.swap import is_swapped, on_swap, swap, variant_state_dict
from attnswap.variants import get_variant

MODEL_TYPE = "attnswap"
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

from attnswap.hf.saved import AttnswapConfig, {", ".join(HEADS.values())}  # noqa: F401
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


# --- save / load -------------------------------------------------------------------------------
STATE_FILE = "attnswap.safetensors"


def save(model: nn.Module, directory: str | Path, tokenizer=None, **save_pretrained_kwargs) -> Path:
    """Save a (swapped) model: HF weights + ``attnswap.safetensors`` + a config.json that loads with the variant.

    A swapped model's config.json is ``model_type: attnswap`` (``AttnswapConfig`` above): transformers loads the
    folder with its variant after ``import attnswap`` or with ``trust_remote_code=True``, and refuses it otherwise.
    A swapped model's own ``save_pretrained`` (and so ``push_to_hub``) lands here too.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_pretrained_kwargs.pop("state_dict", None)
    base_state = {k: v for k, v in model.state_dict().items() if f".{STATE_ATTR}." not in f".{k}"}
    type(model).save_pretrained(model, directory, state_dict=base_state, **save_pretrained_kwargs)  # not ours again
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    elif is_swapped(model):  # recorded, so that loading its tokenizer says why there is none
        model.config.attnswap = {**model.config.attnswap, "tokenizer": False}
    if is_swapped(model):
        state = {k: v.detach().contiguous().cpu() for k, v in variant_state_dict(model).items()}
        tmp = directory / (STATE_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"variant": model.config.attnswap["variant"]})
        tmp.replace(directory / STATE_FILE)  # atomic: a reader never sees half a file
        write_auto_module(directory)
        tmp = directory / "config.json.tmp"
        tmp.write_text(json.dumps(saved_config(model.config, model.config.attnswap), indent=2, sort_keys=True) + "\n")
        tmp.replace(directory / "config.json")
    return directory


def load(directory: str | Path, device: str = "cpu", dtype: str = "float32") -> nn.Module:
    """Load what ``save`` (or a swapped model's ``save_pretrained``) wrote: the base model, the same swap, the
    variant's tensors."""
    from attnswap.hf.models import load_model, read_json_object

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise AttnswapError(f"no saved model at {directory} (missing {config_file.name})")
    swap_info = read_json_object(config_file).get("attnswap")
    # A saved swap (model_type attnswap) comes back swapped through the loader above (``_SwapLoader``).
    model = load_model(str(directory), device=device, dtype=dtype,
                       attn_implementation=(swap_info or {}).get("original_attn_implementation", "sdpa"))
    if swap_info is not None and not is_swapped(model):  # a config of the original type that carries a swap
        swap(model, swap_info["variant"], layers=swap_info["layers"])
        load_variant_tensors(model, directory)
    return model


def load_swapped(directory: Path, config, auto_class=None, **from_pretrained_kwargs):
    """The model ``save`` wrote to ``directory`` (config: its ``AttnswapConfig``) under ``auto_class``'s head
    (default: the causal LM), swapped, in eval mode. ``from_pretrained_kwargs``: the caller's public arguments, passed
    to the original architecture's own ``from_pretrained``; ``output_loading_info=True`` returns (model, info)."""
    from transformers import AutoModelForCausalLM

    swap_info = config.attnswap
    base_config = config.base()
    requested = from_pretrained_kwargs.pop("attn_implementation", None) or config.base_overrides.get("attn_implementation")
    if requested in (None, IMPL_NAME):  # swap() sets ours after loading, beside the implementation it was saved with
        requested = swap_info.get("original_attn_implementation", "sdpa")
    model_class = head_class(auto_class or AutoModelForCausalLM, base_config)
    loaded = model_class.from_pretrained(str(directory), config=base_config, attn_implementation=requested,
                                         **from_pretrained_kwargs)
    model, info = loaded if isinstance(loaded, tuple) else (loaded, None)
    swap(model, swap_info["variant"], layers=swap_info["layers"])
    load_variant_tensors(model, directory)
    return model.eval() if info is None else (model.eval(), info)


def load_variant_tensors(model: nn.Module, directory: Path) -> None:
    """The variant's learned tensors from ``attnswap.safetensors`` or, as save_pretrained leaves them, the weights."""
    expected = variant_state_dict(model)
    if not expected:
        return
    source = directory / STATE_FILE
    if source.is_file() or not (directory / "model.safetensors").is_file():
        loaded = _read_safetensors(source)
    else:
        source = directory / "model.safetensors"
        loaded = {k: v for k, v in _read_safetensors(source).items() if f".{STATE_ATTR}." in f".{k}"}
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise AttnswapError(f"{source} does not match variant {model.config.attnswap['variant']}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(loaded, strict=False)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise AttnswapError(f"missing {path}; save the model again with attnswap.save")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AttnswapError(f"corrupt checkpoint {path}: {exc}; delete it and save again") from None


@on_swap
def _save_pretrained_keeps_the_variant(model: nn.Module) -> None:
    """A swapped model's own ``save_pretrained`` (and so ``push_to_hub``) saves through ``save``."""
    model.save_pretrained = functools.partial(save, model)


# --- the `attnswap swap` command ---------------------------------------------------------------
@dataclass
class SwapConfig:
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variant: str = "window:w=64,sinks=4"
    layers: list[int] | None = None  # default: every layer
    out: str = "runs/swapped"
    device: str = "cpu"
    dtype: str = "float32"
    allow_partial: bool = False  # load a model whose weights do not all match its config (missing ones random)


def swap_to_disk(config: SwapConfig) -> Path:
    """Load ``config.model``, swap in ``config.variant``, save model + tokenizer (when the model has one) to
    ``config.out``: under its lock, never into the model's own folder, each file renamed into place with
    config.json last (``runs.atomic_files``)."""
    from attnswap.hf.models import DEFAULT_MODEL, has_tokenizer, load_model, load_tokenizer
    from attnswap.runs import atomic_files, remove_stale_temps, run_lock

    name = config.model or DEFAULT_MODEL
    variant = get_variant(config.variant)  # a bad spec fails before the weights load
    with run_lock(config.out, inputs={"model": name}) as lock:
        remove_stale_temps(lock.parent)
        model = load_model(name, device=config.device, dtype=config.dtype, allow_partial=config.allow_partial)
        swap(model, variant, layers=config.layers)
        local = Path(name).expanduser()
        tokenizer = None if local.is_dir() and not has_tokenizer(local) else load_tokenizer(name)
        with atomic_files(config.out) as building:
            save(model, building, tokenizer=tokenizer)
    note = "" if tokenizer is not None else f" (no tokenizer: {name} has none; recorded in config.json)"
    print(f"saved {variant.spec} swapped into {name} -> {config.out}{note}")
    return Path(config.out)


_register()
