"""Reading text, token streams and their cache, blocks, splits and the deterministic batch order."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import torch

from attnswap.data import tokens as data
from attnswap.errors import AttnswapError
from tests.conftest import tiny_tokenizer

WIKITEXT = """ 
 = First Article = 
 
 w5 w6 w7 . 
 
 = = A Section = = 
 
 w8 w9 . 
 = Second Article = 
 w10 w11 . 
"""


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))


# --- reading documents ---------------------------------------------------------------------------
def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("w5 w6\nw7\n\n\nw8 w9\n  \nw10\n")
    assert data.load_texts(str(tmp_path / "a.txt")) == ["w5 w6\nw7", "w8 w9", "w10"]


def test_wikitext_articles_start_at_top_level_headings(tmp_path):
    (tmp_path / "wiki.valid.tokens").write_text(WIKITEXT)
    docs = data.load_texts(str(tmp_path / "wiki.valid.tokens"))
    assert docs == ["= First Article =\nw5 w6 w7 .\n= = A Section = =\nw8 w9 .", "= Second Article =\nw10 w11 ."]


def test_gzip_jsonl_and_directories_are_read_in_sorted_order(tmp_path):
    with gzip.open(tmp_path / "b.txt.gz", "wt") as handle:
        handle.write("w7\n\nw8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "w5"}) + "\n\n" + json.dumps({"text": "w6", "id": 2}) + "\n")
    (tmp_path / "notes.md").write_text("not data")
    assert data.load_texts(str(tmp_path)) == ["w5", "w6", "w7", "w8"]


def test_missing_path_error_names_the_path(tmp_path):
    with pytest.raises(AttnswapError, match=f"no data at {tmp_path / 'absent.txt'}"):
        data.load_texts(str(tmp_path / "absent.txt"))
    with pytest.raises(AttnswapError, match=r"no data at .*absent\.txt \(nor .*absent\.txt\)"):
        data.load_texts("absent.txt")


@pytest.mark.parametrize("content", ["", "\n \n\n"], ids=["empty", "blank_lines"])
def test_empty_file_is_refused(tmp_path, content):
    (tmp_path / "e.txt").write_text(content)
    with pytest.raises(AttnswapError, match=f"data file {tmp_path / 'e.txt'} is empty"):
        data.load_texts(str(tmp_path / "e.txt"))


def test_jsonl_without_text_field_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "w5"}\n{"body": "w6"}\n')
    with pytest.raises(AttnswapError, match=r"d\.jsonl:2 has no string field 'text'"):
        data.load_texts(str(tmp_path / "d.jsonl"))


def test_bundled_defaults_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in (data.DISTILL_TEXT, data.WIKITEXT2_VALID, data.WIKITEXT2_TEST):
        assert data.resolve_path(source).is_file()


def test_test_sets_are_recognised(tmp_path):
    assert data.is_test_source(data.WIKITEXT2_TEST)
    assert data.is_test_source("data/wikitext-2")  # a directory holding the test file
    assert data.is_test_source("wikitext-103-raw-v1:test") and data.is_test_source("wikitext-2-raw-v1", "test")
    assert not data.is_test_source(data.DISTILL_TEXT) and not data.is_test_source(data.WIKITEXT2_VALID)
    assert not data.is_test_source("wikitext-103-raw-v1")
    with pytest.raises(AttnswapError, match="refusing to train on test data"):
        data.refuse_test_source(data.WIKITEXT2_TEST)


def test_hub_names_import_datasets_only_when_used():
    code = "import attnswap.data.tokens, attnswap.train.distill, sys; print('datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    with pytest.raises(AttnswapError, match="unknown split 'dev'"):
        data.load_texts("wikitext-2-raw-v1:dev")


def test_hub_name_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails, as on the GPU image
    with pytest.raises(AttnswapError, match=r"pip install 'attnswap\[hub\]'"):
        data.load_texts("wikitext-2-raw-v1")


# --- tokens and their cache ----------------------------------------------------------------------
def test_token_stream_puts_eos_after_every_document(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("w5 w6\n\nw7\n\nw8 w9 w10")
    stream = data.token_stream(str(tmp_path / "a.txt"), tokenizer)
    eos = tokenizer.eos_token_id
    assert stream.dtype == torch.int64 and stream.dim() == 1
    assert stream.tolist() == [5, 6, eos, 7, eos, 8, 9, 10, eos]


def test_token_stream_is_cached_by_content_and_tokenizer(tmp_path, tokenizer):
    source = tmp_path / "a.txt"
    source.write_text("w5 w6\n\nw7")
    first = data.token_stream(str(source), tokenizer)
    assert len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a cached stream was tokenised again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", no_tokenising)
        assert torch.equal(data.token_stream(str(source), tokenizer), first)
    source.write_text("w5 w6\n\nw8")  # new content, new key
    assert data.token_stream(str(source), tokenizer).tolist()[-2] == 8
    assert len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 2
    other = tiny_tokenizer()
    other.add_tokens(["w5w6"])  # another tokenizer, another key
    data.token_stream(str(source), other)
    assert len(list((tmp_path / "cache").glob("tokens-*.npy"))) == 3


def test_damaged_cache_is_rebuilt(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("w5 w6\n\nw7")
    first = data.token_stream(str(tmp_path / "a.txt"), tokenizer)
    (cache_file,) = (tmp_path / "cache").glob("tokens-*.npy")
    cache_file.write_bytes(b"\x93NUMPY garbage")
    assert torch.equal(data.token_stream(str(tmp_path / "a.txt"), tokenizer), first)
    assert not list((tmp_path / "cache").glob("*.tmp"))


# --- blocks and batch order ----------------------------------------------------------------------
def test_pack_blocks_drops_the_ragged_tail():
    blocks = data.pack_blocks(torch.arange(23), 5)
    assert blocks.shape == (4, 5) and blocks[-1].tolist() == [15, 16, 17, 18, 19]
    with pytest.raises(AttnswapError, match="fewer than one block of 30"):
        data.pack_blocks(torch.arange(23), 30)


def test_split_blocks_is_seeded_disjoint_and_complete():
    blocks = torch.arange(103 * 3).view(103, 3)
    train, val = data.split_blocks(blocks, 0.1, seed=7)
    again_train, again_val = data.split_blocks(blocks, 0.1, seed=7)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert len(val) == 10 and len(train) == 93
    rows = sorted(r[0] for r in torch.cat([train, val]).tolist())
    assert rows == list(range(0, 309, 3))
    assert not torch.equal(data.split_blocks(blocks, 0.1, seed=8)[1], val)


def test_block_order_is_a_permutation_per_epoch_and_shards_exactly():
    n_blocks = 11
    order = data.block_order(n_blocks, seed=3, start=0, count=3 * n_blocks)
    for epoch in range(3):
        assert sorted(order[epoch * n_blocks : (epoch + 1) * n_blocks].tolist()) == list(range(n_blocks))
    assert not torch.equal(order[:n_blocks], order[n_blocks : 2 * n_blocks])
    # Any window of samples, e.g. one rank's shard of a step that straddles an epoch, is the same slice.
    assert torch.equal(data.block_order(n_blocks, 3, 9, 4), order[9:13])
    assert not torch.equal(data.block_order(n_blocks, 4, 0, n_blocks), order[:n_blocks])
