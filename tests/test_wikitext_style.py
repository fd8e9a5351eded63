"""attnswap.data.wikitext_style: plain articles in WikiText's spelling, and distillation on them."""

from __future__ import annotations

import pytest

from attnswap.data.tokens import token_stream
from attnswap.train.distill import DistillConfig
from attnswap.errors import AttnswapError
from attnswap.data.wikitext_style import render, rare_words, restyle, tokenise

ARTICLE = """Cresta Run (horse)
Cresta Run (1924 – after 1930) was a British racehorse. She won £4,880 in 1926, and ran 1.5 miles.
Racing career.
The horse's trainer didn't run her at two-year-old level; H. Loder said "no" in the U.S. too!"""


def test_an_article_is_written_the_way_wikitext_writes_it():
    assert render(ARTICLE).split("\n") == [
        "= Cresta Run ( horse ) =",
        "Cresta Run ( 1924 – after 1930 ) was a British racehorse . She won £4 @,@ 880 in 1926 , and ran 1 @.@ 5 "
        "miles .",
        "= = Racing career = =",
        "The horse 's trainer did n't run her at two @-@ year @-@ old level ; H. Loder said \" no \" in the U.S. too !",
    ]


def test_words_rarer_than_the_cut_become_unk_and_plain_leaves_text_alone():
    articles = ["Title\nalpha beta beta gamma. Two sentences.", "Other\nbeta gamma gamma. Two sentences."]
    rare = rare_words(articles, below=2)
    assert rare == {"Title", "alpha", "Other"}
    assert render(articles[0], rare) == "= <unk> =\n<unk> beta beta gamma . Two sentences ."
    assert restyle(articles, "plain") is articles
    assert tokenise("a  b\tc") == "a b c"


def test_distillation_data_style_changes_the_tokens_and_is_checked(tmp_path, gpt2_tokenizer_or_skip):
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join([ARTICLE] * 5 + [ARTICLE.replace("Cresta", "Crest")]))  # "Crest" is rare
    plain = token_stream(data, gpt2_tokenizer_or_skip, cache_dir=tmp_path / "cache")
    styled = token_stream(data, gpt2_tokenizer_or_skip, cache_dir=tmp_path / "cache", style="wikitext")
    assert plain.tolist() != styled.tolist(), "the style must reach the tokens and have its own cache entry"
    documents = gpt2_tokenizer_or_skip.decode(styled.tolist()).split("<|endoftext|>")
    assert documents[0].startswith("= Cresta Run ( horse ) =\nCresta Run ( 1924 – after 1930 )")
    assert documents[5].startswith("= <unk> Run ( horse ) =")
    with pytest.raises(AttnswapError, match="data_style must be one of plain, wikitext"):
        DistillConfig(data_style="markdown")


@pytest.fixture
def gpt2_tokenizer_or_skip():
    from attnswap.hf.models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)
