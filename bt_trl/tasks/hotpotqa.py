"""The paper's HotPotQA task: a multi-hop retrieval program answering questions that need two Wikipedia paragraphs.

Program (all three modules ChainOfThought on the one LM being trained): two hops, each generating a search query
from the question and the passages found so far and retrieving 3 passages; then an answer from the (deduplicated)
passages and the question. Metric: exact match of the answer (`dspy.evaluate.answer_exact_match`, SQuAD-normalized).

Retrievers (`retrieval.py`): `"colbertv2"` is the paper's ColBERTv2 server over Wikipedia 2017 abstracts (network);
`"bm25"` is BM25 over the context paragraphs of every loaded record (offline). In HotPotQA's distractor setting each
record's context holds its two gold paragraphs among eight distractors, so the pooled corpus contains the gold
paragraphs of every question, hidden among all the others.

Data: `hotpotqa/hotpot_qa` (config `distractor`) from the Hub — train and val from the official train split, test from
the official dev ("validation") split, as in DSPy's HotPotQA loader — or local JSONL in the official schema or the
Hub's (a single file is split three ways). Only `hard` questions are kept, as in the paper.
"""

from __future__ import annotations

from functools import lru_cache

import datasets
import dspy
from dspy.evaluate import answer_exact_match

from bt_trl.tasks.retrieval import BM25Retriever, ColBERTv2Retriever, Retriever, parse_retriever
from bt_trl.tasks.sources import Records, read_records, split_examples

HUB_ID = "hotpotqa/hotpot_qa"
HUB_CONFIG = "distractor"
TEST_SPLIT = "validation"  # the official dev set: HotPotQA's test answers are not public
PASSAGES_PER_HOP = 3
HOPS = 2


class MultiHop(dspy.Module):
    """Query → retrieve → query → retrieve → answer. The retriever is shared by every copy of the program."""

    def __init__(self, retriever: Retriever, passages_per_hop: int = PASSAGES_PER_HOP, hops: int = HOPS):
        super().__init__()
        self.retriever = retriever
        self.passages_per_hop = passages_per_hop
        self.generate_query = [dspy.ChainOfThought("context: list[str], question -> search_query") for _ in
                               range(hops)]
        self.generate_answer = dspy.ChainOfThought("context: list[str], question -> answer")

    def forward(self, question: str):
        context: list[str] = []
        for generate_query in self.generate_query:
            query = generate_query(context=context, question=question).search_query
            context = list(dict.fromkeys(context + self.retriever(query, self.passages_per_hop)))
        return self.generate_answer(context=context, question=question)


def program(retriever: str | Retriever = "bm25", data_path: str = HUB_ID) -> MultiHop:
    """The multi-hop program with a retriever object, or one named by `retrieval.parse_retriever`: `"bm25"` indexes
    the paragraphs of the records at `data_path` (once per process), `"colbertv2[:url]"` queries a ColBERTv2 server."""
    if not isinstance(retriever, str):
        return MultiHop(retriever)
    kind, url = parse_retriever(retriever)
    if kind == "colbertv2":
        return MultiHop(ColBERTv2Retriever(url) if url else ColBERTv2Retriever())
    return MultiHop(bm25_retriever(data_path))


def metric(example: dspy.Example, prediction, trace=None) -> bool:
    return answer_exact_match(example, prediction, trace)


@lru_cache(maxsize=2)
def bm25_retriever(data_path: str = HUB_ID) -> BM25Retriever:
    return BM25Retriever(corpus(load_records(data_path)))


@lru_cache(maxsize=2)
def load_records(data_path: str = HUB_ID) -> dict[str, Records]:
    """Records per split, `hard` questions only (read once per process: the splits and the BM25 corpus share them)."""
    return {name: _only_hard(records) for name, records in read_records(data_path, HUB_CONFIG).items()}


def load_splits(seed: int = 0, sizes: tuple[int, int, int] = (200, 300, 500), data_path: str = HUB_ID):
    return split_examples(load_records(data_path), seed, sizes, TEST_SPLIT, to_example)


def corpus(records: dict[str, Records]) -> list[str]:
    """Every context paragraph of every record as `"title | text"`, one passage per title."""
    passages: dict[str, str] = {}
    for split in records.values():
        for record in split:
            for title, text in paragraphs(record):
                passages.setdefault(title, f"{title} | {text}")
    return list(passages.values())


def to_example(record: dict) -> dspy.Example:
    return dspy.Example(question=record["question"], answer=record["answer"],
                        gold_titles=gold_titles(record)).with_inputs("question")


def paragraphs(record: dict) -> list[tuple[str, str]]:
    """(title, text) of each context paragraph, from the official schema (`[[title, sentences], ...]`) or the Hub's
    (`{"title": [...], "sentences": [...]}`). Sentences carry their own leading spaces, so they are joined as is."""
    context = record["context"]
    pairs = zip(context["title"], context["sentences"]) if isinstance(context, dict) else context
    return [(title, "".join(sentences)) for title, sentences in pairs]


def gold_titles(record: dict) -> list[str]:
    """Titles of the supporting paragraphs, in either schema."""
    facts = record["supporting_facts"]
    titles = facts["title"] if isinstance(facts, dict) else [title for title, _ in facts]
    return list(dict.fromkeys(titles))


def _only_hard(records: Records) -> Records:
    if isinstance(records, datasets.Dataset):
        return records.filter(lambda level: level == "hard", input_columns="level")
    return [record for record in records if record["level"] == "hard"]
