"""Loading pretrained causal LMs (GPT-2 and Llama-family) by hub name or local directory, offline-friendly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path

import torch
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.paths import DEFAULT_MODEL, REPO_ROOT, files_digest
from attnswap.validate import check_device, check_loading_info, check_model_config, check_weights_fit_config

log = logging.getLogger(__name__)

# The JSON files of a model folder that loading reads; a damaged one is named before transformers trips over it.
MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.json")
# What a tokenizer leaves in a folder; a folder with none of them has no tokenizer (transformers would build an empty one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def git_commit() -> str:
    """``ATTNSWAP_COMMIT`` when set (a copy of the tree on a GPU machine, whose own git metadata may be stale), else
    HEAD of the checkout attnswap runs from, ``-dirty`` if tracked files changed, else ``unknown``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    if given := os.environ.get("ATTNSWAP_COMMIT"):
        return given
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise AttnswapError(f"unknown dtype {dtype!r}; choose from: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """``device`` (auto, cpu, cuda[:i], mps) as a torch device that exists on this machine, else refused."""
    return check_device(device)


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: "str | torch.dtype" = "float32",
               attn_implementation: str = "sdpa", allow_partial: bool = False) -> nn.Module:
    """A pretrained causal LM in eval mode: ``gpt2``, ``distilgpt2``, a Llama/Mistral/Qwen2 name, or a local dir.

    Loaded whole or not at all: a config.json that asks for more weights than the folder holds is refused before
    anything is allocated, and missing, unused or misshapen weights after loading (``attnswap.validate``), unless
    ``allow_partial``, which loads what fits and warns."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from attnswap.hf.model_sources import resolve_model_source

    name_or_path = resolve_model_source(name_or_path)  # a named or .gguf model: its cached plain folder
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a model that loads in a second
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    local = Path(name_or_path).expanduser()
    if _looks_like_path(name_or_path) and not (local / "config.json").is_file():
        raise AttnswapError(f"no model at {local} (expected {local / 'config.json'}); give a model directory or hub name")
    saved_swap = False
    if local.is_dir():
        check_model_files(local)
        saved_swap = _check_config_against_weights(local, allow_partial)
    try:
        with _load_report_held_back():
            loaded = AutoModelForCausalLM.from_pretrained(
                str(local) if local.exists() else name_or_path, dtype=torch_dtype,
                attn_implementation=attn_implementation,
                # A saved swap's loader (hf.saved) returns the model alone; its weights were compared above.
                **({} if saved_swap else {"output_loading_info": True})
            )
            model, info = (loaded, {}) if saved_swap else loaded
            # Inside the hold: a load refused here prints its error line alone, not transformers' report too.
            problems = check_loading_info(info, name_or_path, allow_partial)
    except OSError as exc:
        raise AttnswapError(
            f"cannot load model {name_or_path!r} ({str(exc).splitlines()[0]}); offline, pass a local directory "
            f"such as {DEFAULT_MODEL}"
        ) from None
    except AttnswapError:  # attnswap's own loading code, run by transformers for a saved swapped model
        raise
    except (SafetensorError, ValueError) as exc:  # truncated weights; a config transformers cannot read
        raise _cannot_load(name_or_path, local, exc) from None
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise
        raise _cannot_load(name_or_path, local, exc) from None
    for problem in problems:
        log.warning("--allow-partial: %s: %s", name_or_path, problem)
    return model.to(torch_device).eval()


def _check_config_against_weights(directory: Path, allow_partial: bool) -> bool:
    """Its config read by transformers and compared with its weights (``check_weights_fit_config``) before any
    tensor is allocated; returns whether the folder is a saved swap."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # transformers' strict config classes raise many types for a bad field
        detail = str(exc).replace("\n", " ")[:200] if str(exc) else type(exc).__name__
        raise AttnswapError(f"{directory / 'config.json'} cannot be read by transformers ({detail}); restore it from "
                            "the original model") from None
    saved_swap = hasattr(config, "base")  # hf.saved.AttnswapConfig: the original's config inside
    try:
        base = config.base() if saved_swap else config
    except Exception as exc:
        raise AttnswapError(f"{directory / 'config.json'}: its base_config cannot be read by transformers "
                            f"({str(exc).splitlines()[0][:200]}); save the model again") from None
    check_weights_fit_config(directory, base, exact=saved_swap, allow_partial=allow_partial)
    return saved_swap


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    from attnswap.hf.model_sources import resolve_model_source

    name_or_path = resolve_model_source(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_model_files(local)
        if not has_tokenizer(local):
            saved_without = (read_json_object(local / "config.json").get("attnswap") or {}).get("tokenizer") is False \
                if (local / "config.json").is_file() else False
            why = "was saved without one (its model had none)" if saved_without else "holds no tokenizer files"
            raise AttnswapError(f"{local} {why}; give the original model's folder or hub name for the tokenizer "
                                "(--model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise AttnswapError(f"cannot load a tokenizer for {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_digest(name_or_path: str, part: str) -> str:
    """sha256 of a model's weight files (``part`` "weights") or tokenizer files ("tokenizer"), names and bytes: a
    local folder, or a hub model as cached on this machine (else its name, all that can be known offline)."""

    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # not cached, not a repo name: nothing to hash
            return f"hub:{name_or_path}"
    if part == "weights":
        files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    else:
        files = sorted(directory / name for name in (*TOKENIZER_FILES, "merges.txt", "special_tokens_map.json")
                       if (directory / name).is_file())
    return files_digest(files)


def has_tokenizer(directory: Path) -> bool:
    """Whether a model folder holds tokenizer files of its own."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; a file that is empty, not JSON or not an object is refused in one line."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = "empty" if not path.read_bytes().strip() else f"not valid JSON ({str(exc).splitlines()[0]})"
        raise AttnswapError(f"{path} is {problem}; restore it from the original model or save the model again") \
            from None
    if not isinstance(data, dict):
        raise AttnswapError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from the original "
                            "model or save the model again")
    return data


def check_model_files(directory: Path) -> None:
    """Read every JSON file of a model folder that loading will read, so a damaged one is named."""
    for name in MODEL_JSON_FILES:
        if (directory / name).is_file():
            data = read_json_object(directory / name)
            if name == "config.json":
                check_model_config(directory / name, data)
                check_model_config(directory / name, data.get("base_config") or {})  # a saved swap's original


@contextlib.contextmanager
def _load_report_held_back():
    """Hold transformers' multi-line load report until the load succeeded and was accepted: a refused load gets one
    line instead. Whether the report reaches the root logger too is transformers' choice (it propagates when CI is
    set), so it is held at the logger that makes it."""
    logger = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in held:  # reached only when the load succeeded
        logger.handle(record)


def _cannot_load(name: str, local: Path, exc: Exception) -> AttnswapError:
    """One line for a model folder transformers could not load: the damaged weights file when it is one."""
    from safetensors import SafetensorError

    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not isinstance(exc, SafetensorError) and "mismatch" not in str(exc):
        return AttnswapError(f"cannot load model {name!r}: {detail}")
    weights = sorted(p.name for p in local.glob("*.safetensors") if p.name != "attnswap.safetensors") \
        if local.is_dir() else []
    where = local / weights[0] if len(weights) == 1 else local
    if "mismatch" in str(exc):
        detail = "its tensor shapes do not match config.json"
    return AttnswapError(f"cannot load model {name!r}: {where} is damaged ({detail}); copy or save the model again")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None: RoPE without a hard limit)."""
    config = model.config
    if getattr(config, "model_type", "") == "gpt2":
        return config.n_positions
    return getattr(config, "max_position_embeddings", None)


def check_length(model: nn.Module, length: int) -> None:
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise AttnswapError(f"sequence length {length} exceeds the model's {limit} positions; use a length <= {limit}")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1
