"""Where task records come from: the Hugging Face Hub (for users with network) or local JSONL files (offline), and
the seeded train/val/test split shared by the GSM8K and HotPotQA tasks."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import dspy

from bt_trl.serving.models import check_local_path

Records = Sequence[dict]  # a list of JSON objects or a datasets.Dataset (rows read on demand)


def read_records(data_path: str, hub_config: str | None = None) -> dict[str, Records]:
    """Records per split name.

    `data_path` is a local `.jsonl` file or a folder holding one (a single pool, returned as split "train"), a local
    folder of `<split>.jsonl` files, or anything `datasets.load_dataset(data_path, hub_config)` loads: a Hub id or a
    local copy of a Hub dataset repository. A path that does not exist raises here, before any model work.
    """
    path = Path(data_path).expanduser()
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.is_file() else []
    if path.is_file() and path.suffix != ".jsonl":
        raise ValueError(f"data file {path} is not a .jsonl file")
    if len(files) == 1:
        return {"train": _read_jsonl(files[0])}
    if files:
        return {file.stem: _read_jsonl(file) for file in files}
    check_local_path(data_path, "data path")
    return dict(datasets.load_dataset(str(path) if path.exists() else data_path, hub_config))


def split_examples(records: dict[str, Records], seed: int, sizes: tuple[int, int, int], test_split: str,
                   to_example: Callable[[dict], dspy.Example]):
    """Seeded train/val/test examples. Train and val are drawn without overlap from split "train"; test from
    `test_split` when the source has it (the official test set), otherwise from the rest of "train"."""
    if "train" not in records:
        raise ValueError(f"the data has no 'train' split (splits: {sorted(records)})")
    n_train, n_val, n_test = sizes
    pool, test_pool = records["train"], records.get(test_split)
    needed = n_train + n_val + (n_test if test_pool is None else 0)
    if needed > len(pool):
        raise ValueError(f"asked for {needed} examples from split 'train', which has {len(pool)}")
    if test_pool is not None and n_test > len(test_pool):
        raise ValueError(f"asked for {n_test} test examples from split {test_split!r}, which has {len(test_pool)}")
    order = random.Random(seed).sample(range(len(pool)), needed)
    test_order = order[n_train + n_val:] if test_pool is None else random.Random(seed).sample(range(len(test_pool)),
                                                                                              n_test)
    test_pool = pool if test_pool is None else test_pool
    return ([to_example(pool[i]) for i in order[:n_train]],
            [to_example(pool[i]) for i in order[n_train:n_train + n_val]],
            [to_example(test_pool[i]) for i in test_order])


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

