"""The paper's tasks (Iris's Predict variant, GSM8K and HotPotQA on the shared data), the retrievers, and
`bt-trl reproduce` on a real grid."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import datasets
import dspy
import pytest
from conftest import teach_format, tiny_model
from trl import ModelConfig

import bt_trl
from bt_trl import BetterTogetherConfig
from bt_trl.cli import main, reproduce
from bt_trl.cli.train import TaskArguments
from bt_trl.core.runner import ProgramRunner
from bt_trl.integrations.hub import load_program_state
from bt_trl.serving.engine import GenerationSettings, TransformersBackend, serving_lm
from bt_trl.tasks import get_task, gsm8k, hotpotqa, iris, load_task
from bt_trl.tasks.retrieval import BM25Retriever

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_DIR = DATA / "gsm8k"
HOTPOTQA_DIR = DATA / "hotpotqa"
needs_data = pytest.mark.skipif(not (GSM8K_DIR.exists() and HOTPOTQA_DIR.exists()),
                                reason="the shared GSM8K/HotPotQA data is not on this machine")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_iris_predict_is_the_paper_iris_without_the_reasoning_field():
    """Same flowers, split and metric as `iris`; the program answers without a reasoning field (no placeholder to
    copy), and a pushed run's program is rebuilt by the task's name."""
    paper, predict = load_task("iris", 3, (7, 5, 4)), load_task("iris_predict", 3, (7, 5, 4))
    for split in ("train", "val", "test"):
        assert getattr(paper, split) == getattr(predict, split)
    assert predict.metric is iris.metric
    program = predict.program()
    [predictor] = program.predictors()
    assert list(predictor.signature.output_fields) == ["answer"]
    assert "reasoning" in paper.program().predict.signature.output_fields
    program.demos = predict.train[:2]
    rebuilt = get_task("iris_predict").program()
    rebuilt.load_state(program.dump_state())
    assert [dict(demo) for demo in rebuilt.demos] == [example.toDict() for example in program.demos]


def test_a_single_predict_program_loads_from_its_file(tmp_path):
    """DSPy saves a program that is one `Predict` flat (no module name): `bt-trl evaluate`, `load_program` and
    `load_dspy_program` read it, with the same checks as a program of named modules."""
    program = get_task("iris_predict").program()
    program.demos = iris.load_splits(0, (2, 0, 0))[0]
    path = tmp_path / "program.json"
    program.save(str(path))
    checked = get_task("iris_predict").program()
    load_program_state(checked, path)
    rebuilt = bt_trl.load_dspy_program(path, get_task("iris_predict").program())
    for loaded in (checked, rebuilt):
        assert loaded.dump_state() == program.dump_state() and loaded.lm is None
    state = json.loads(path.read_text())
    path.write_text(json.dumps(dict(state, lm={"model": "openai/gpt-4o", "api_base": "http://evil"})))
    with pytest.raises(ValueError, match="'self' names its own LM"):
        load_program_state(get_task("iris_predict").program(), path)
    path.write_text(json.dumps(dict(state, forward="x")))
    with pytest.raises(ValueError, match="keys a DSPy module does not save.*forward"):
        load_program_state(get_task("iris_predict").program(), path)


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------------------------------

@needs_data
def test_gsm8k_local_splits_and_metric():
    task = load_task("gsm8k", 0, (30, 20, 25), data_path=str(GSM8K_DIR))
    assert (len(task.train), len(task.val), len(task.test)) == (30, 20, 25)
    train_questions = {r["question"] for r in read_jsonl(GSM8K_DIR / "train.jsonl")}
    test_questions = {r["question"] for r in read_jsonl(GSM8K_DIR / "test.jsonl")}
    assert all(e.question in train_questions for e in task.train + task.val)
    assert all(e.question in test_questions for e in task.test)  # the official test split, not carved from train
    assert not {e.question for e in task.train} & {e.question for e in task.val}
    for example in task.train:
        assert set(example.inputs().keys()) == {"question"} and example.answer.lstrip("-").isdigit()
        assert "####" not in example.gold_reasoning and example.gold_reasoning
    # Another split seed draws other examples; the same seed the same ones.
    assert load_task("gsm8k", 1, (30, 0, 0), data_path=str(GSM8K_DIR)).train != task.train
    assert load_task("gsm8k", 0, (30, 0, 0), data_path=str(GSM8K_DIR)).train == task.train

    example = task.train[0]
    gold = int(example.answer)
    assert gsm8k.metric(example, dspy.Prediction(answer=example.answer))
    assert gsm8k.metric(example, dspy.Prediction(answer=f"So the total is {gold:,}."))
    assert not gsm8k.metric(example, dspy.Prediction(answer=str(gold + 1)))
    assert not gsm8k.metric(example, dspy.Prediction(answer="I do not know"))


@needs_data
def test_gsm8k_hub_code_path_on_a_local_copy_of_the_hub_repository(tmp_path, monkeypatch):
    # openai/gsm8k's layout: parquet files per config, declared in the README's `configs`. load_dataset reads this
    # folder exactly as it reads the Hub repository.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "gsm8k"
    (repo / "main").mkdir(parents=True)
    for split in ("train", "test"):
        datasets.Dataset.from_list(read_jsonl(GSM8K_DIR / f"{split}.jsonl")[:40]).to_parquet(
            repo / "main" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                    "    path: main/train-*\n  - split: test\n    path: main/test-*\n---\n")
    train, val, test = gsm8k.load_splits(3, (10, 5, 8), data_path=str(repo))
    assert [len(s) for s in (train, val, test)] == [10, 5, 8]
    for split, examples in (("train", train + val), ("test", test)):
        expected = [gsm8k.to_example(r) for r in read_jsonl(GSM8K_DIR / f"{split}.jsonl")[:40]]
        assert all(e in expected for e in examples)


def test_bad_task_options_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("gsm8k", 0, (1, 1, 1), data_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown retriever 'tfidf'"):
        load_task("hotpotqa", 0, (1, 1, 1), retriever="tfidf")
    with pytest.raises(ValueError, match="takes no option data_path"):
        load_task("iris", 0, (1, 1, 1), data_path=str(tmp_path))
    with pytest.raises(ValueError, match="takes no option retriever"):
        load_task("gsm8k", 0, (1, 1, 1), retriever="bm25")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mnist", 0, (1, 1, 1))
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(ValueError, match="not a .jsonl file"):
        load_task("gsm8k", 0, (1, 1, 1), data_path=str(tmp_path / "data.json"))


# ---------------------------------------------------------------------------------------------------------------------
# HotPotQA
# ---------------------------------------------------------------------------------------------------------------------

@needs_data
def test_hotpotqa_local_splits_metric_and_hub_schema():
    records = read_jsonl(HOTPOTQA_DIR / "hotpot_dev_distractor_sample.jsonl")
    task = load_task("hotpotqa", 0, (40, 30, 50), data_path=str(HOTPOTQA_DIR), retriever="bm25")
    splits = task.train, task.val, task.test
    assert [len(s) for s in splits] == [40, 30, 50]
    questions = [{e.question for e in s} for s in splits]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    by_question = {r["question"]: r for r in records}
    for example in task.train:
        record = by_question[example.question]
        assert example.answer == record["answer"] and set(example.inputs().keys()) == {"question"}
        assert set(example.gold_titles) == {title for title, _ in record["supporting_facts"]}

    example = task.train[0]
    assert hotpotqa.metric(example, dspy.Prediction(answer=example.answer))
    assert hotpotqa.metric(example, dspy.Prediction(answer=f"the {example.answer.upper()}."))  # SQuAD-normalized
    assert not hotpotqa.metric(example, dspy.Prediction(answer=example.answer + " and more"))

    # The Hub's schema (parallel lists) reads the same as the official one.
    record = records[0]
    hub_record = dict(record, context={"title": [t for t, _ in record["context"]],
                                       "sentences": [s for _, s in record["context"]]},
                      supporting_facts={"title": [t for t, _ in record["supporting_facts"]],
                                        "sent_id": [i for _, i in record["supporting_facts"]]})
    assert hotpotqa.paragraphs(hub_record) == hotpotqa.paragraphs(record)
    assert hotpotqa.gold_titles(hub_record) == hotpotqa.gold_titles(record)
    assert hotpotqa.paragraphs(record)[0][1].startswith(record["context"][0][1][0])


@needs_data
def test_bm25_finds_the_gold_paragraphs():
    records = read_jsonl(HOTPOTQA_DIR / "hotpot_dev_distractor_sample.jsonl")
    retriever = hotpotqa.bm25_retriever(str(HOTPOTQA_DIR))
    assert len(retriever.passages) > 10_000  # the pooled paragraphs of all 1,500 records, one per title
    found = 0
    for record in records[:60]:
        titles = {passage.split(" | ")[0] for passage in retriever(record["question"], 3)}
        found += bool(titles & set(hotpotqa.gold_titles(record)))
    assert found >= 45, f"a gold paragraph was in the top 3 for only {found} of 60 questions"


@needs_data
def test_program_is_json_saveable_and_shares_its_retriever_across_copies(tmp_path):
    program = hotpotqa.program("bm25", str(HOTPOTQA_DIR))
    assert program.retriever is hotpotqa.program("bm25", str(HOTPOTQA_DIR)).retriever  # indexed once per process
    copy = program.deepcopy()
    assert copy.retriever is program.retriever and copy.generate_answer is not program.generate_answer
    assert [name for name, _ in program.named_predictors()] == [
        "generate_query[0].predict", "generate_query[1].predict", "generate_answer.predict"]

    example = load_task("hotpotqa", 0, (2, 0, 0), data_path=str(HOTPOTQA_DIR)).train[0]
    program.generate_answer.predict.demos = [dspy.Example(example, reasoning="Both paragraphs say so.")]
    program.save(str(tmp_path / "program.json"))  # DSPy's JSON state format, no pickle
    state = json.loads((tmp_path / "program.json").read_text())
    assert state["generate_answer.predict"]["demos"][0]["gold_titles"] == example.gold_titles
    loaded = hotpotqa.program("bm25", str(HOTPOTQA_DIR))
    loaded.load(str(tmp_path / "program.json"))
    assert loaded.generate_answer.predict.demos[0]["answer"] == example.answer


class ColBERTv2API(BaseHTTPRequestHandler):
    """A ColBERTv2 server's search API (`GET ?query=&k=` → `{"topk": [{"text", "pid", "score"}]}`), answering from a
    BM25 index: the real DSPy client code path, without network."""

    retriever: BM25Retriever

    def do_GET(self):
        params = parse_qs(urlparse(self.path).query)
        passages = self.retriever(params["query"][0], int(params["k"][0]))
        body = json.dumps({"topk": [{"text": p, "pid": i, "score": 1.0} for i, p in enumerate(passages)]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@needs_data
def test_colbertv2_client_retriever():
    retriever = hotpotqa.bm25_retriever(str(HOTPOTQA_DIR))
    handler = type("Handler", (ColBERTv2API,), {"retriever": retriever})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/wiki17_abstracts"
        task = load_task("hotpotqa", 0, (1, 0, 0), data_path=str(HOTPOTQA_DIR), retriever=f"colbertv2:{url}")
        program = task.program()
        assert program.retriever.url == url and program.deepcopy().retriever is program.retriever
        query = "Which magazine was started first, Arthur's Magazine or First for Women?"
        assert program.retriever(query, 3) == retriever(query, 3)
    finally:
        server.shutdown()


def first_sentence_retriever() -> BM25Retriever:
    """BM25 over the shared records' paragraphs cut to their first sentence: the same kind of passages, in prompts
    short enough for a tiny model to learn the program's output format in a few seconds of training."""
    passages = {}
    for record in read_jsonl(HOTPOTQA_DIR / "hotpot_dev_distractor_sample.jsonl"):
        for title, sentences in record["context"]:
            passages.setdefault(title, f"{title} | {sentences[0]}")
    return BM25Retriever(list(passages.values()))


def gold_hotpotqa_rows(program, examples) -> list[dict]:
    """Chat rows of the three module calls for each example, formatted by DSPy's ChatAdapter as at inference: the
    gold paragraphs' titles as the two search queries, the gold answer last."""
    adapter = dspy.ChatAdapter()
    rows = []
    for example in examples:
        context, calls = [], []
        for generate_query, title in zip(program.generate_query, example.gold_titles):
            calls.append((generate_query.predict, {"context": context, "question": example.question},
                          {"reasoning": "Search for it.", "search_query": title}))
            context = list(dict.fromkeys(context + program.retriever(title, 3)))
        calls.append((program.generate_answer.predict, {"context": context, "question": example.question},
                      {"reasoning": "The passages say it.", "answer": example.answer}))
        for predictor, inputs, outputs in calls:
            messages = adapter.format_finetune_data(predictor.signature, [], inputs, outputs)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


@needs_data
def test_hotpotqa_program_end_to_end_on_a_tiny_model(tokenizer):
    # A tiny random model taught the three module calls of one question (gold titles as queries, gold answer) runs the
    # real program: real generation, real BM25 retrieval between the hops, DSPy's parsing and tracing.
    task = load_task("hotpotqa", 0, (1, 0, 0), data_path=str(HOTPOTQA_DIR))
    program = hotpotqa.program(first_sentence_retriever())
    model = tiny_model(tokenizer)
    teach_format(model, tokenizer, gold_hotpotqa_rows(program, task.train), steps=120, batch_size=3)
    with serving_lm(TransformersBackend(model.eval(), tokenizer), "tiny-hotpotqa", GenerationSettings(max_tokens=64)) \
            as lm:
        [call] = ProgramRunner(task.metric, num_threads=1).run(program, task.train, lm, with_trace=True)
    assert call.error is None, f"the program call failed: {call.error}"
    assert [predictor for predictor, _, _ in call.trace] == [
        program.generate_query[0].predict, program.generate_query[1].predict, program.generate_answer.predict]
    (_, first, query), (_, second, _), (_, last, _) = call.trace
    assert first["context"] == [] and len(second["context"]) == 3
    assert 3 < len(last["context"]) <= 6 and last["context"][:3] == second["context"]  # hop 2 found new passages
    assert query["search_query"] == task.train[0].gold_titles[0]
    assert call.passed and call.prediction.answer == task.train[0].answer  # exact match through both hops


# ---------------------------------------------------------------------------------------------------------------------
# bt-trl reproduce
# ---------------------------------------------------------------------------------------------------------------------

def test_reproduce_grid_writes_results_and_resumes(format_model, tokenizer, tmp_path):
    model_dir = tmp_path / "tiny-format-model"
    format_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    grid = reproduce.GridArguments(strategies=["vanilla", "w"], seeds=[0, 1])
    task_args = TaskArguments(task="iris", train_size=6, val_size=4, test_size=4)
    args = BetterTogetherConfig(
        str(tmp_path / "grid"), report_to="none", num_candidate_programs=0, max_bootstrapped_demos=1,
        max_labeled_demos=1, generation_max_tokens=48, num_train_epochs=1, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", max_length=1024, use_cpu=True,
    )
    model_args = ModelConfig(model_name_or_path=str(model_dir), use_peft=True, lora_r=8,
                             lora_target_modules=["q_proj", "v_proj"])
    records, failures = reproduce.main(grid, task_args, args, model_args)

    assert not failures and len(records) == 4
    for record in records:
        summary = json.loads((record.folder / "summary.json").read_text())
        assert summary["test_score"] == record.test_score and 0 <= record.test_score <= 100
    trained = [r for r in records if r.strategy == "w"]
    assert all([s.kind for s in r.steps] == ["vanilla", "w"] for r in trained)
    assert (tmp_path / "grid" / "w" / "seed_1" / "step_1_w" / "sft_dataset.jsonl").exists()

    results = (tmp_path / "grid" / "RESULTS.md").read_text()
    assert "trace_rounds=1;" in results and "weights float32, bf16 training False." in results
    for strategy in grid.strategies:
        mean, std = reproduce.mean_std([r.test_score for r in records if r.strategy == strategy])
        assert f"| {strategy} | {mean:.1f} ± {std:.1f} | 2 |" in results
    kept = sum(r.steps[1].traces_kept for r in trained) / 2
    assert "| w | 1 (w) |" in results and f"| {kept:.1f} / 6 |" in results
    assert (tmp_path / "grid" / "RESULTS.png").read_bytes().startswith(b"\x89PNG")

    # Finished runs are skipped: a second call runs nothing and reports the same table.
    stamps = {r.folder: (r.folder / "summary.json").stat().st_mtime_ns for r in records}
    again, failures = reproduce.main(grid, task_args, args, model_args)
    assert not failures and {r.folder: (r.folder / "summary.json").stat().st_mtime_ns for r in again} == stamps
    assert (tmp_path / "grid" / "RESULTS.md").read_text() == results


def test_reproduce_grid_starts_a_run_from_the_steps_it_shares_with_a_finished_run(format_model, tokenizer, tmp_path):
    """`w -> w` after `w` copies the `w` run's step and runs only its second w step; `w` after `w -> w` runs no step
    (its steps are the first ones of `w -> w`). Each equals the same run made from scratch in the other grid."""
    model_dir = tmp_path / "tiny-format-model"
    format_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    task_args = TaskArguments(task="iris", train_size=6, val_size=4, test_size=4)
    model_args = ModelConfig(model_name_or_path=str(model_dir), use_peft=True, lora_r=8,
                             lora_target_modules=["q_proj", "v_proj"])

    def grid(strategies: list[str], root: str) -> list[reproduce.RunRecord]:
        args = BetterTogetherConfig(
            str(tmp_path / root), report_to="none", generation_max_tokens=48, num_train_epochs=1,
            per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no", max_length=1024, use_cpu=True,
        )
        records, failures = reproduce.main(reproduce.GridArguments(strategies=strategies, seeds=[0]), task_args, args,
                                           model_args)
        assert not failures
        return records

    short, extended = grid(["w", "w -> w"], "short_first")  # w from scratch, then w -> w from its step
    long, derived = grid(["w -> w", "w"], "long_first")  # w -> w from scratch, then w from its first step

    def started_from(record: reproduce.RunRecord) -> str | None:
        return json.loads((record.folder / "summary.json").read_text()).get("started_from")

    assert started_from(short) is None and started_from(long) is None
    assert started_from(extended) == "w/seed_0" and started_from(derived) == "w-w/seed_0"
    assert [s.kind for s in extended.steps] == ["vanilla", "w", "w"] and [s.kind for s in derived.steps] == [
        "vanilla", "w"]
    assert extended.steps[1] == short.steps[1] and derived.steps == long.steps[:2]  # copied, not rerun
    assert extended.wall_seconds > sum(s.seconds for s in short.steps)
    assert derived.wall_seconds >= sum(s.seconds for s in long.steps[:2])
    assert not (derived.folder / "step_2_w").exists()  # only the shared steps were copied
    for step in (1, 2):
        name = f"step_{step}_w/sft_dataset.jsonl"
        assert (extended.folder / name).read_text() == (long.folder / name).read_text()
    assert (derived.folder / "step_1_w/sft_dataset.jsonl").read_text() == (
        short.folder / "step_1_w/sft_dataset.jsonl").read_text()
    assert [s.val_score for s in extended.steps] == [s.val_score for s in long.steps]
    assert [s.val_score for s in derived.steps] == [s.val_score for s in short.steps]
    assert extended.test_score == long.test_score and derived.test_score == short.test_score


@pytest.mark.parametrize("strategy", ["p", "w"])
def test_reproduce_grid_stops_on_ctrl_c_and_resumes_the_interrupted_run(strategy, format_model, tokenizer, tmp_path):
    """Ctrl-C in the middle of a run stops the whole grid (it is not one failed run to skip past), with one line
    saying how to go on; the next call resumes that run after its last completed step and goes on with the rest. Run
    as a user runs it: `bt-trl reproduce` in its own process, with SIGINT arriving at the first metric call of step 1:
    in the p step inside DSPy's executor (which turns Ctrl-C into an Exception of its own), in the w step while the
    traces are collected."""
    model_dir = tmp_path / "tiny-format-model"
    format_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    root = tmp_path / "grid"
    val_size = 4
    arguments = ["reproduce", "--task", "iris", "--train_size", "6", "--val_size", str(val_size), "--test_size", "4",
                 "--strategies", strategy, "--seeds", "0", "1", "--output_dir", str(root),
                 "--model_name_or_path", str(model_dir), "--use_peft", "--lora_r", "8", "--lora_target_modules",
                 "q_proj", "v_proj", "--generation_max_tokens", "48", "--num_train_epochs", "1",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--save_strategy", "no",
                 "--max_length", "1024", "--report_to", "none", "--use_cpu", "--num_candidate_programs", "1"]
    first_run = root / strategy / "seed_0"
    interrupted = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "interrupting_cli.py"), str(val_size + 1), *arguments],
        capture_output=True, text=True, timeout=600)
    output = interrupted.stdout + interrupted.stderr
    assert interrupted.returncode == 130, output[-3000:]
    assert "bt-trl reproduce: interrupted (Ctrl-C); the same command again" in interrupted.stderr, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    state = json.loads((first_run / "bettertogether_state.json").read_text())
    assert [s["kind"] for s in state["steps"]] == ["vanilla"]  # interrupted in step 1
    assert not (first_run / "summary.json").exists() and not (root / strategy / "seed_1").exists()

    again = subprocess.run([sys.executable, "-m", "bt_trl.cli", *arguments], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 run(s) finished, 0 failed" in again.stdout
    assert "Resuming after step 0 (vanilla)" in (first_run / "run.log").read_text()
    for seed in (0, 1):
        summary = json.loads((root / strategy / f"seed_{seed}" / "summary.json").read_text())
        assert 0 <= summary["test_score"] <= 100


def resident_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_reproduce_gives_a_runs_freed_memory_back_to_the_os():
    """Between runs the grid returns freed heap memory: blocks of a few MB freed between live ones (what loading,
    serving and training a model leave) stay resident after `free` — glibc keeps them in its arenas — until
    `release_freed_memory`, after which resident memory falls by most of what was freed."""
    import torch

    # Freeing a 24 MB block raises glibc's mmap threshold, as loading a model does: MB-sized blocks then come from the
    # heap (not from mmap, whose blocks go back to the OS on free).
    block = torch.empty(24 * 2**20, dtype=torch.uint8)
    del block
    blocks = [torch.ones(4 * 2**20, dtype=torch.uint8) for _ in range(128)]  # 4 MB each, written (resident)
    freed, kept = blocks[0::2], blocks[1::2]  # a live block after each freed one: the heap cannot shrink from its top
    del blocks
    before = resident_mb()
    freed.clear()
    after_free = resident_mb()
    reproduce.release_freed_memory()
    after_release = resident_mb()
    assert before - after_free < 64, (before, after_free)  # free() alone gave little back
    assert after_free - after_release > 192, (after_free, after_release)  # 256 MB were freed
    assert len(kept) == 64  # alive until here


def test_reproduce_grid_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown step 'x y'"):
        reproduce.GridArguments(strategies=["vanilla", "p -> x y"])
    with pytest.raises(ValueError, match="unknown step 'x'"):  # not built in, nor in --prompt_optimizers
        main(["reproduce", "--strategies", "vanilla", "p -> x", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="distinct"):
        reproduce.GridArguments(seeds=[0, 0])
    assert reproduce.run_folder("out", "p -> w -> p", 2) == Path("out/p-w-p/seed_2")
