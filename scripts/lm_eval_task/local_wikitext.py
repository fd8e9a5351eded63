"""lm-eval's own wikitext detokeniser and per-document counts, for the local task beside this file."""

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401
