"""Passage retrievers for the multi-hop HotPotQA program: `retriever(query, k)` → the `k` best passages as
`"title | text"` strings (the format of the paper's wiki17_abstracts index).

* `ColBERTv2Retriever` — DSPy's ColBERTv2 client against a ColBERTv2 server; the default URL is the server of the
  paper's experiments (Wikipedia 2017 abstracts). Needs network.
* `BM25Retriever` — offline BM25 (the `bm25s` library) over a local passage corpus, e.g. the context paragraphs of
  HotPotQA records (`hotpotqa.corpus`).

Programs are deep-copied many times per optimization step (DSPy copies students, teachers and candidates), so a
retriever is shared by every copy of a program instead of being copied: both retrievers are read-only after
construction and return themselves from `__deepcopy__`. They keep no state DSPy saves: a program's JSON holds its
prompts only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import dspy

# The ColBERTv2 server over Wikipedia 2017 abstracts used by the paper (and DSPy's HotPotQA tutorials).
WIKI17_ABSTRACTS_URL = "http://20.102.90.50:2017/wiki17_abstracts"
RETRIEVERS = ("bm25", "colbertv2")


class Retriever(Protocol):
    def __call__(self, query: str, k: int) -> list[str]: ...


class SharedAcrossCopies:
    """Read-only after construction, so every deep copy of a program may use the same instance."""

    def __deepcopy__(self, memo):
        return self


class ColBERTv2Retriever(SharedAcrossCopies):
    """DSPy's ColBERTv2 client; `url` is the server's search endpoint (DSPy caches its answers)."""

    def __init__(self, url: str = WIKI17_ABSTRACTS_URL):
        self.url = url
        self.client = dspy.ColBERTv2(url=url)

    def __call__(self, query: str, k: int) -> list[str]:
        return self.client(query, k=k, simplify=True)

    def __repr__(self) -> str:
        return f"ColBERTv2Retriever(url={self.url!r})"


class BM25Retriever(SharedAcrossCopies):
    """BM25 over `passages` (English stopwords removed, lower-cased), indexed once at construction."""

    def __init__(self, passages: Sequence[str]):
        import bm25s
        from bm25s.tokenization import Tokenizer

        if not passages:
            raise ValueError("BM25Retriever needs a non-empty passage corpus")
        self.passages = list(passages)
        self.tokenizer = Tokenizer(stopwords="en")
        self.index = bm25s.BM25()
        self.index.index(self.tokenizer.tokenize(self.passages, show_progress=False, return_as="ids"),
                         show_progress=False)
        # DSPy runs programs from many threads; the tokenizer's vocabulary lookups and the scorer are not documented
        # as thread-safe, and a query takes about a millisecond, so queries run one at a time.
        self.lock = threading.Lock()

    def __call__(self, query: str, k: int) -> list[str]:
        k = min(k, len(self.passages))
        with self.lock:
            query_ids = self.tokenizer.tokenize([query], update_vocab=False, show_progress=False, return_as="ids")
            documents, _ = self.index.retrieve(query_ids, k=k, show_progress=False, n_threads=1)
        return [self.passages[i] for i in documents[0]]

    def __repr__(self) -> str:
        return f"BM25Retriever({len(self.passages)} passages)"


def parse_retriever(spec: str) -> tuple[str, str | None]:
    """`"bm25"`, `"colbertv2"` or `"colbertv2:<url>"` → (kind, url). Raises ValueError for anything else."""
    kind, _, url = spec.partition(":")
    if kind not in RETRIEVERS or (kind == "bm25" and url):
        raise ValueError(
            f"unknown retriever {spec!r}: use 'bm25' (offline, over the loaded records' paragraphs), "
            f"'colbertv2' (the paper's server, {WIKI17_ABSTRACTS_URL}) or 'colbertv2:<url of a ColBERTv2 server>'"
        )
    return kind, url or None
