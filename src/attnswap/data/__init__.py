"""Text to token blocks: the bundled and hub corpora, long documents, the WikiText restyling of training text."""
