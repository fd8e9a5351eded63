"""The edges: every value a user hands in is checked here, once, before any work, in one ``AttnswapError`` line that
names the field and what it may be.

- Command configs (``check_config_values``, called by ``attnswap.config``): integers fit in 64 bits, floats are finite,
  seeds lie in 0..2**63-1, devices are ones torch offers here, and what a batch holds fits in this machine's memory.
- YAML (``load_yaml``): duplicate keys are refused and alias expansion is capped (a "billion laughs" file is refused,
  not printed).
- Text (``check_text_file``): UTF-8 without control bytes, refused at the offending byte offset.
- Token ids (``check_token_ids``): inside the vocabulary.
- Model folders (``check_model_config``, ``check_weights_fit_config``, ``check_loading_info``): config.json fields of
  the right types, and a config that asks for no more weights than the folder holds, checked on the meta device before
  any tensor is allocated; after loading, missing, unexpected or misshapen weights are refused unless the user allows a
  partial load.
- Paths (``check_disjoint``, ``contained_file``): an output folder never equals, contains or lies inside an input,
  and a file named by a run record stays inside its run folder.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from attnswap.errors import AttnswapError

INT64_MAX = 2**63 - 1
SEED_FIELDS = ("seed",)
# Config fields whose value is a count of tokens (or sequences) held in memory at once; with batch_size, their product
# is the size of one batch of int64 token ids, which must fit in this machine's memory.
TOKEN_FIELDS = ("seq_len", "context", "lengths", "attn_sample_len", "grad_len", "max_new_tokens", "gen_tokens")
BATCH_FIELDS = ("batch_size",)
YAML_NODE_LIMIT = 100_000  # nodes of a YAML document after alias expansion; real configs hold a few hundred
CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # C0 controls and DEL; tab, newlines and form feed pass
SHOWN_CHARS = 60  # of a bad value, in an error line


def shown(value: Any) -> str:
    """``repr(value)`` cut to SHOWN_CHARS, so that an error line stays one short line whatever it quotes."""
    if isinstance(value, int) and value.bit_length() > 200:  # repr of a huge int is slow, or refused past 4300 digits
        return f"an integer of {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"


# --- YAML ---------------------------------------------------------------------------------------
class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a key given twice in one mapping and a document whose aliases expand past
    YAML_NODE_LIMIT nodes."""

    def construct_document(self, node):
        _expanded_size(node, {}, self.name)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                continue  # unhashable: SafeLoader refuses it itself
            if key in seen:
                raise AttnswapError(f"{self.name}: key {shown(key)} is given twice (lines {seen[key] + 1} and "
                                    f"{key_node.start_mark.line + 1}); give it once")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict[int, int], where: str) -> int:
    """Nodes of ``node`` with every alias expanded (shared nodes counted once per use); refused past the limit."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, where) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, where) + _expanded_size(v, memo, where) for k, v in node.value)
    if size > YAML_NODE_LIMIT:
        raise AttnswapError(f"{where}: its aliases expand to more than {YAML_NODE_LIMIT:,} values; write the values "
                            "out instead of nesting aliases")
    memo[id(node)] = size
    return size


def load_yaml(text: str, where: str) -> Any:
    """``text`` as YAML through ``StrictLoader``; ``where`` names it in errors (a file, or ``--key``)."""
    loader = StrictLoader(text)
    loader.name = where
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError) as exc:  # an integer literal past Python's 4300 digits
        if isinstance(exc, AttnswapError):
            raise
        raise AttnswapError(f"{where}: {str(exc).splitlines()[0][:120]}; give a smaller value") from None
    finally:
        loader.dispose()


# --- command configs ----------------------------------------------------------------------------
def memory_bytes() -> int:
    """This machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def check_numbers(values: dict[str, Any]) -> None:
    """Every integer (in lists too) fits in 64 bits and every float is finite."""
    for key, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            _check_number(key, item)


def check_config_values(config: Any) -> None:
    """Bounds that hold for every command's config: see the module docstring."""
    values = dataclasses.asdict(config)
    check_numbers(values)
    for key in SEED_FIELDS:
        seed = values.get(key)
        if isinstance(seed, int) and not 0 <= seed <= INT64_MAX:
            raise AttnswapError(f"{key} must be in 0..2**63-1, got {key}={shown(seed)}")
    if isinstance(values.get("device"), str):
        check_device(values["device"])
    budget = memory_bytes() // 8  # int64 token ids this machine could hold at all
    batch = max([values[k] for k in BATCH_FIELDS if isinstance(values.get(k), int)] or [1])
    for key in (*BATCH_FIELDS, *TOKEN_FIELDS):
        value = values.get(key)
        longest = max(value) if isinstance(value, (list, tuple)) and value else value
        if not isinstance(longest, int) or isinstance(longest, bool):
            continue
        factor = 1 if key in BATCH_FIELDS else batch
        if longest * factor > budget:
            limit = budget // factor
            per = "" if factor == 1 else f" at batch_size {factor}"
            raise AttnswapError(f"{key}={shown(longest)}{per} is more tokens than this machine's "
                                f"{memory_bytes() / 2**30:.0f} GiB could hold; use {key} <= {limit:,}")


def _check_number(key: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise AttnswapError(f"{key}={shown(value)} does not fit in 64 bits; give a value in -2**63..2**63-1")
    if isinstance(value, float) and not math.isfinite(value):
        raise AttnswapError(f"{key}={value} is not a finite number; give a finite value")


def check_device(device: str) -> "torch.device":  # noqa: F821 (torch is imported late: configs load without it)
    """``device`` as a torch device that exists here: auto, cpu, cuda[:i] (a visible GPU) or mps (where available)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    offered = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
                                 if torch.cuda.is_available() else [])
    if torch.backends.mps.is_available():
        offered.append("mps")
    if parsed is not None and parsed.type == "cuda" and not torch.cuda.is_available():
        raise AttnswapError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    if parsed is not None and parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise AttnswapError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                            f"choose from: {', '.join(offered)}")
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps") or (
            parsed.type == "mps" and "mps" not in offered):
        raise AttnswapError(f"device {shown(device)} is not one this machine offers; choose from: {', '.join(offered)}")
    return parsed


# --- text and tokens ----------------------------------------------------------------------------
def check_text_file(path: Path, what: str = "data file") -> None:
    """``path`` (gzipped when it ends in .gz) decodes as UTF-8 and holds no control bytes; read in 1 MiB pieces,
    nothing kept. The error names the byte offset (in the decompressed text of a .gz)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    unpacked = " of the decompressed text" if path.name.endswith(".gz") else ""
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as handle:
            for piece in iter(lambda: handle.read(1 << 20), b""):
                control = CONTROL_BYTES.search(piece)
                if control is not None:
                    raise AttnswapError(f"{what} {path} holds control byte 0x{control.group()[0]:02x} at byte offset "
                                        f"{offset + control.start():,}{unpacked}; give plain UTF-8 text")
                pending = decoder.getstate()[0]  # the start of a character the previous piece cut
                try:
                    decoder.decode(piece)
                except UnicodeDecodeError as exc:
                    at, byte = offset - len(pending) + exc.start, (pending + piece)[exc.start]
                    raise AttnswapError(f"{what} {path} is not UTF-8 text: byte 0x{byte:02x} at byte offset "
                                        f"{at:,}{unpacked} ({exc.reason}); save it as UTF-8") from None
                offset += len(piece)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                at = offset - len(pending) + exc.start
                problem = ("it ends inside a character" if exc.reason == "unexpected end of data"
                           else f"byte 0x{pending[exc.start]:02x} ({exc.reason})")
                raise AttnswapError(f"{what} {path} is not UTF-8 text: {problem} at byte offset {at:,}{unpacked}; "
                                    "save it as UTF-8") from None
    except (OSError, EOFError) as exc:
        raise AttnswapError(f"cannot read {what} {path}: {exc}; give a UTF-8 text file") from None


def check_token_ids(ids: "torch.Tensor", vocab_size: int, where: str) -> None:  # noqa: F821
    """Every id in 0..vocab_size-1; ``where`` names their source (a token cache) and what to do."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise AttnswapError(f"{where} holds token id {bad}, outside the vocabulary 0..{vocab_size - 1}; delete it to "
                            "rebuild it, or use the tokenizer the ids were made with")


# --- model folders ------------------------------------------------------------------------------
# config.json fields that size a model: positive integers (a string or a float would reach transformers' own code)
SIZE_FIELDS = ("n_embd", "n_layer", "n_head", "n_positions", "n_inner", "vocab_size", "hidden_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "max_position_embeddings", "head_dim", "sliding_window")


def check_model_config(path: Path, data: dict) -> None:
    """The fields of a config.json (already read as ``data``) that transformers would trip over."""
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise AttnswapError(f"{path}: model_type={shown(model_type)} must be a string such as \"gpt2\" or \"llama\"")
    for key in SIZE_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
            raise AttnswapError(f"{path}: {key}={shown(value)} must be an integer in 1..2**31-1; restore config.json "
                                "from the original model")


def weights_files(directory: Path) -> list[Path]:
    """The safetensors files of a model folder that hold its base weights (a swap's variant state excluded)."""
    return sorted(p for p in directory.glob("*.safetensors") if p.name != "attnswap.safetensors")


def check_weights_fit_config(directory: Path, config, exact: bool = False, allow_partial: bool = False) -> None:
    """Refuse, before anything is allocated, a config.json that describes a larger model than its weights hold (a
    GPT-2 relabelled ``llama`` would otherwise build a default-size Llama), counted on the meta device. ``exact``:
    also compare every weight's name and shape with the config's model (for folders attnswap saved, whose names are
    the model's own), refused as ``check_loading_info`` refuses."""
    import torch
    from transformers import AutoModelForCausalLM

    files = weights_files(directory)
    if not files:
        return
    stored = stored_shapes(files)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types for a config it cannot build
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise AttnswapError(f"{directory / 'config.json'} does not describe a model transformers can build "
                            f"({type(exc).__name__}: {detail})") from None
    if exact:
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
        info = {"missing_keys": sorted(set(expected) - set(stored) - tied),
                "unexpected_keys": sorted(set(stored) - set(expected)),
                "mismatched_keys": sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])}
        if check_loading_info(info, str(directory), allow_partial):
            return  # allowed partial: transformers loads what fits
    wanted, held = sum(p.numel() for p in skeleton.parameters()), sum(math.prod(s) for s in stored.values())
    # Far more than the weights hold: refused here, before the allocation; a few missing ones are named by name after
    # loading (check_loading_info).
    if wanted > 1.25 * held and not allow_partial:
        raise AttnswapError(f"{directory / 'config.json'} (model_type {config.model_type!r}) describes {wanted:,} "
                            f"parameters but {', '.join(f.name for f in files)} hold {held:,}: config and weights "
                            "disagree; restore config.json from the original model (or pass --allow-partial true)")


def stored_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in ``files``, read from their headers (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise AttnswapError(f"cannot load model: {file} is damaged ({str(exc).splitlines()[0]}); copy or save "
                                "the model again") from None
    return shapes


def check_loading_info(info: dict, name: str, allow_partial: bool) -> list[str]:
    """transformers' ``output_loading_info``: missing, unexpected or misshapen weights are refused in one line unless
    ``allow_partial``; returns what was wrong (for a warning when allowed)."""
    problems = []
    for key, what in (("missing_keys", "missing (randomly initialised)"), ("unexpected_keys", "unused"),
                      ("mismatched_keys", "of the wrong shape (its shapes do not match config.json)")):
        found = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if found:
            problems.append(f"{len(found)} weight(s) {what}, e.g. {found[0]}")
    if info.get("error_msgs"):
        problems.append(str(info["error_msgs"][0]).splitlines()[0])
    if problems and not allow_partial:
        raise AttnswapError(f"model {name!r} does not load whole: {'; '.join(problems)}; its config.json and weights "
                            "disagree (restore them), or pass --allow-partial true if you mean it")
    return problems


# --- paths --------------------------------------------------------------------------------------
def real_path(path: str | Path, key: str) -> Path:
    """``path`` absolute with every symlink followed; a symlink loop is refused in one line."""
    try:
        return Path(path).expanduser().resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise AttnswapError(f"--{key} {path}: cannot follow its symlinks ({exc}); give a plain path") from None


def check_disjoint(out: str | Path, inputs: dict[str, Any], key: str = "out", allow_inside: bool = False) -> None:
    """Refuse an output folder equal to, inside or above any input (``inputs``: field -> path or list of paths;
    empty values and hub names that are not paths are skipped). ``allow_inside``: a folder inside an input is
    allowed (a report beside its run), not one equal to or above it."""
    target = real_path(out, key)
    for field_name, given in inputs.items():
        for source in given if isinstance(given, (list, tuple)) else [given]:
            if not source or not isinstance(source, (str, Path)) or not os.path.lexists(Path(source).expanduser()):
                continue
            source_path = real_path(source, field_name)
            if target == source_path:
                relation = "is"
            elif source_path in target.parents and not allow_inside:
                relation = "lies inside"
            elif target in source_path.parents:
                relation = "contains"
            else:
                continue
            raise AttnswapError(f"--{key} {out} {relation} the input --{field_name} {source}: a run never writes "
                                f"where it reads; choose an --{key} outside every input")


def contained_file(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` where ``name`` (read from a run record) is a plain file name: no folders, no ``..``, no
    absolute path, no symlink out of ``folder``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise AttnswapError(f"{what} names the file {shown(name)}, which is not a plain file name inside {folder}; "
                            "delete the checkpoint or start without --resume")
    path = folder / name
    if path.is_symlink() and real_path(path, "resume").parent != real_path(folder, "out"):
        raise AttnswapError(f"{what} names {path}, a symlink out of {folder}; delete the checkpoint or start "
                            "without --resume")
    return path
