"""Text in, token blocks out: local files or WikiText from the hub, tokenised once and cached, packed into blocks.

A source is a hub name (``wikitext-2-raw-v1``, ``wikitext-103-raw-v1``, optionally ``name:split``) or a path:
``.txt`` (documents separated by blank lines), ``.raw`` / ``.tokens`` (WikiText: a document per `` = Title = ``
heading), ``.jsonl`` (a document per line, field ``"text"``), any of those gzipped (``.gz``), or a directory of
such files (all of them, sorted by path). Relative paths are looked up in the working directory, then in the
repository, so the bundled defaults work from anywhere.

Documents are joined into one token stream with EOS between them (``token_stream``), cached under
``.cache/attnswap/`` by a hash of the text, the tokenizer and the format, and cut into fixed-length blocks
(``pack_blocks``). Training reads blocks in an order that is a pure function of (seed, sample index)
(``block_order``), so a resumed or re-sharded run sees exactly the same batches.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from attnswap.data.wikitext_style import restyle
from attnswap.errors import AttnswapError
from attnswap.paths import REPO_ROOT, default_cache_dir, files_digest
from attnswap.validate import check_text_file, check_token_ids

HUB_DATASETS = ("wikitext-2-raw-v1", "wikitext-103-raw-v1")
HUB_SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl")
DISTILL_TEXT = "data/english/wiki-distill.txt.gz"
WIKITEXT2_VALID = "data/wikitext-2/wiki.valid.tokens"
WIKITEXT2_TEST = "data/wikitext-2/wiki.test.tokens"
CACHE_FORMAT = 1  # bump when tokenisation or document splitting changes, so old caches are not reused
_WIKITEXT_HEADING = re.compile(r"^ ?= [^=].* = ?$")  # a top-level heading starts a new article
_TEST_NAME = re.compile(r"(^|[._-])test([._-]|$)")


# --- where the text comes from ------------------------------------------------------------------
def parse_hub(source: str, split: str | None) -> tuple[str, str] | None:
    """``"wikitext-2-raw-v1:validation"`` -> (name, split); None when ``source`` is not a hub name."""
    name, _, named_split = source.partition(":")
    if name not in HUB_DATASETS:
        return None
    split = named_split or split or "train"
    if split not in HUB_SPLITS:
        raise AttnswapError(f"unknown split {split!r} for {name}; choose from: {', '.join(HUB_SPLITS)}")
    return name, split


def resolve_path(source: str | Path) -> Path:
    """A local source as an existing path: as given (relative to the working directory), else in the repo."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    in_repo = REPO_ROOT / path
    if not path.is_absolute() and in_repo.exists():
        return in_repo
    looked = str(path.resolve()) + ("" if path.is_absolute() else f" (nor {in_repo})")
    raise AttnswapError(f"no data at {looked}; give a text file, a directory, or one of: {', '.join(HUB_DATASETS)}")


def data_files(path: Path) -> list[Path]:
    """The text files a path stands for: itself, or every supported file under a directory, sorted."""
    if path.is_file():
        if _format(path) is None:
            raise AttnswapError(f"unsupported data file {path}; use {', '.join(TEXT_SUFFIXES)} (optionally .gz)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _format(p) is not None)
    if not files:
        raise AttnswapError(f"no data files in {path}; expected {', '.join(TEXT_SUFFIXES)} (optionally .gz)")
    return files


def is_test_source(source: str, split: str | None = None) -> bool:
    """Whether ``source`` is a test set: a hub test split or a file named like ``wiki.test.tokens``."""
    hub = parse_hub(source, split)
    if hub is not None:
        return hub[1] == "test"
    return any(_TEST_NAME.search(f.name) for f in data_files(resolve_path(source)))


def refuse_test_source(source: str, split: str | None = None) -> None:
    """Training on the evaluation's test set would make every later number meaningless."""
    if is_test_source(source, split):
        raise AttnswapError(f"refusing to train on test data {source!r}; use {DISTILL_TEXT} or a train split")


def check_readable(source: str, split: str | None = None) -> None:
    """Every local file ``source`` stands for is text: UTF-8 without control bytes (``validate.check_text_file``,
    which names the offending byte offset), so that a damaged text is refused before any weights load. Hub names and
    an empty source pass."""
    if not source or parse_hub(source, split) is not None:
        return
    for file in data_files(resolve_path(source)):
        check_text_file(file)


# --- reading documents --------------------------------------------------------------------------
def load_texts(source: str | Path, split: str | None = None) -> list[str]:
    """The documents of ``source``: a hub name (``split`` defaults to train) or a local file or directory."""
    hub = parse_hub(str(source), split)
    if hub is not None:
        return _hub_texts(*hub)
    documents = []
    for file in data_files(resolve_path(source)):
        found = _read_documents(file)
        if not found:
            raise AttnswapError(f"data file {file} is empty")
        documents.extend(found)
    return documents


def _format(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix
    return suffix if suffix in TEXT_SUFFIXES else None


def _read_documents(file: Path) -> list[str]:
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise AttnswapError(f"cannot read data file {file}: {exc}; give a UTF-8 text file") from None
    kind = _format(file)
    if kind == ".jsonl":
        return _jsonl_documents(file, text)
    if kind in (".raw", ".tokens"):
        return wikitext_documents(text.splitlines())
    return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def _jsonl_documents(file: Path, text: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AttnswapError(f"{file}:{number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise AttnswapError(f"{file}:{number} has no string field 'text'")
        if record["text"].strip():
            documents.append(record["text"].strip())
    return documents


def wikitext_documents(lines: list[str]) -> list[str]:
    """WikiText lines -> articles (a new one at each top-level heading), blank lines dropped."""
    documents: list[list[str]] = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if _WIKITEXT_HEADING.match(line) or not documents:
            documents.append([])
        documents[-1].append(line.strip())
    return ["\n".join(doc) for doc in documents]


def _hub_texts(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise AttnswapError(f"{name} comes from the Hugging Face hub: pip install 'attnswap[hub]' "
                            f"(or use a local file such as {DISTILL_TEXT})") from None
    try:
        rows = datasets.load_dataset("wikitext", name, split=split)["text"]
    except Exception as exc:  # datasets raises many types for offline / missing data
        raise AttnswapError(f"cannot load {name}:{split} from the hub ({str(exc).splitlines()[0]})") from None
    return wikitext_documents(rows)


# --- tokens -------------------------------------------------------------------------------------
def token_stream(source: str | Path, tokenizer, split: str | None = None,
                 cache_dir: str | Path | None = None, style: str = "plain") -> torch.Tensor:
    """All documents of ``source`` as one 1-D int64 tensor of token ids, EOS after each document (cached).

    ``style`` "wikitext" renders plain articles the way WikiText writes them first (``attnswap.data.wikitext_style``)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AttnswapError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; documents cannot be separated")
    hub = parse_hub(str(source), split)
    texts = None
    if hub is not None:
        texts = load_texts(str(source), split)
        content = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    else:
        files = data_files(resolve_path(source))
        content = files_digest(files)
    style_tag = "" if style == "plain" else f"|{style}"  # plain keeps the keys of caches made before styles
    key = f"{CACHE_FORMAT}|{content}|{tokenizer_fingerprint(tokenizer)}{style_tag}"
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = _load_cached(cache / f"tokens-{key}.npy")
    if cached is not None:
        ids = torch.from_numpy(cached.astype(np.int64))
        check_token_ids(ids, len(tokenizer), f"token cache {cache / f'tokens-{key}.npy'}")
        return ids
    texts = restyle(texts if texts is not None else load_texts(source, split), style)
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = np.array([len(ids) + 1 for ids in encoded])
    stream = np.full(int(lengths.sum()), eos, dtype=np.int32)  # EOS already sits at every document's end
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for start, ids in zip(starts, encoded):
        stream[start : start + len(ids)] = ids
    _save_atomic(cache / f"tokens-{key}.npy", stream)
    return torch.from_numpy(stream.astype(np.int64))


def source_digest(source: str, split: str | None = None) -> str:
    """What a source holds, as a sha256: of a file's bytes (its name aside: a moved text is the same text), of a
    folder's files' names and bytes, or a hub text's name and split (the hub's own versioning decides its content).
    "" for no source."""
    if not source:
        return ""
    hub = parse_hub(source, split)
    if hub is not None:
        return ":".join(hub)
    path = resolve_path(source)
    return files_digest(data_files(path), names=path.is_dir())


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would split text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        described = backend.to_str()
    else:
        described = f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}"
    return hashlib.sha256(f"{described}|eos={tokenizer.eos_token_id}".encode()).hexdigest()


def _load_cached(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None  # a damaged cache is rebuilt, never trusted


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one temp file per process: ranks may race here
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)


# --- blocks -------------------------------------------------------------------------------------
def pack_blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    """(N,) token stream -> (N // block_len, block_len) blocks; the ragged tail is dropped."""
    n_blocks = stream.numel() // block_len
    if n_blocks == 0:
        raise AttnswapError(f"the data has {stream.numel()} tokens, fewer than one block of {block_len}; "
                            "use more text or a shorter seq_len")
    return stream[: n_blocks * block_len].view(n_blocks, block_len)


def split_blocks(blocks: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of blocks into (train, validation); at least one block on each side."""
    if not 0 < val_fraction < 1:
        raise AttnswapError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_blocks = blocks.shape[0]
    if n_blocks < 2:
        raise AttnswapError(f"only {n_blocks} block of data; a validation split needs at least 2")
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(n_blocks * val_fraction)), n_blocks - 1)
    return blocks[perm[n_val:].sort().values], blocks[perm[:n_val].sort().values]


def block_order(n_blocks: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Block indices for global samples ``start .. start+count-1``: a fresh seeded permutation every epoch.

    A pure function of its arguments, so any rank can compute its shard of any step without state.
    """
    samples = torch.arange(start, start + count)
    epochs, offsets = samples // n_blocks, samples % n_blocks
    order = torch.empty(count, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        # Reduced to 63 bits: any seed in 0..2**63-1 (validate.SEED_FIELDS) gives a valid generator seed.
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
        perm = torch.randperm(n_blocks, generator=generator)
        chosen = epochs == epoch
        order[chosen] = perm[offsets[chosen]]
    return order
