"""Two real processes (`accelerate launch`, gloo on CPU) running a tiny `p -> w -> p` together."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "multirank_worker.py"
CONFIG = REPO / "accelerate_configs" / "cpu_2proc.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, format_model_state, tokenizer):
    from conftest import tiny_model

    model = tiny_model(tokenizer)
    model.load_state_dict(format_model_state)
    folder = tmp_path_factory.mktemp("format_model")
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, output_dir, report_dir, *worker_args, timeout=420) -> subprocess.CompletedProcess:
    report_dir.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
        "--main_process_port", str(free_port()), str(WORKER), "--model", str(model_dir),
        "--output_dir", str(output_dir), "--report_dir", str(report_dir), *worker_args,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def reports(report_dir) -> list[dict]:
    return [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_ranks_share_the_calls_and_agree(model_dir, tmp_path):
    run = launch(model_dir, tmp_path / "out", tmp_path / "reports")
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = reports(tmp_path / "reports")
    assert rank0["world_size"] == rank1["world_size"] == 2

    # Every rank ends every step with the same program, and trains on the same SFT rows.
    assert rank0["program_hashes"] == rank1["program_hashes"] and set(rank0["program_hashes"]) == {"0", "1", "2", "3"}
    assert rank0["final_program"] == rank1["final_program"]
    assert rank0["dataset_hashes"] == rank1["dataset_hashes"] and list(rank0["dataset_hashes"]) == ["2"]

    # Valset scoring (8 examples x 4 steps, and at the w step's 2 checkpoints) and trace collection (10) were split
    # in halves.
    assert rank0["program_calls"] == rank1["program_calls"] == (4 * 8 + 2 * 8 + 10) // 2

    # The p steps' generation batches were split too; only the main rank wrote the run's files.
    steps = json.loads((tmp_path / "out" / "results.json").read_text())["steps"]
    for step in steps:
        assert sum(step["lm_calls_per_rank"]) == step["program_calls"]
        assert min(step["lm_calls_per_rank"]) > 0
    assert steps[2]["traces_total"] == 10 and steps[2]["sft_examples"] == steps[2]["traces_kept"] > 0
    assert (tmp_path / "out" / "step_2_w" / "adapter_model.safetensors").exists()
    assert [epoch for _, epoch, _ in steps[2]["val_curve"]] == [0, 1, 2]
    assert not (tmp_path / "out" / "step_2_w" / "best_checkpoint").exists()


def test_grpo_step_on_two_ranks_shares_the_rollouts_and_agrees(model_dir, tmp_path):
    run = launch(model_dir, tmp_path / "out", tmp_path / "reports", "--strategy", "grpo")
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = reports(tmp_path / "reports")
    # Both ranks trained the same weights (DDP) and end on the same program.
    assert rank0["weights"] == rank1["weights"] and rank0["final_program"] == rank1["final_program"]
    # Valset scoring (8 examples at the start, at the checkpoint of its one pass and at the end) and the rollouts
    # (10 examples x 2) were split in halves.
    assert rank0["program_calls"] == rank1["program_calls"] == (8 + 8 + 8 + 10 * 2) // 2

    steps = json.loads((tmp_path / "out" / "results.json").read_text())["steps"]
    assert steps[1]["kind"] == "grpo" and steps[1]["first_loss"] is not None
    assert [epoch for _, epoch, _ in steps[1]["val_curve"]] == [0, 1]
    rows = (tmp_path / "out" / "step_1_grpo" / "grpo_rollouts.jsonl").read_text().splitlines()
    assert {(json.loads(row)["example"], json.loads(row)["rollout"]) for row in rows} == {
        (e, k) for e in range(10) for k in range(2)
    }  # every rank's rollouts, in the main rank's file


def test_a_dying_rank_stops_the_job_and_the_run_resumes(model_dir, tmp_path):
    out = tmp_path / "out"
    crashed = launch(model_dir, out, tmp_path / "crashed", "--optimizer", "bootstrap", "--die_after_step", "2")
    assert crashed.returncode != 0
    assert "exitcode  : 3" in crashed.stderr  # torchrun names the rank that died and stops the other
    state = json.loads((out / "bettertogether_state.json").read_text())
    assert [s["kind"] for s in state["steps"]] == ["vanilla", "p", "w"]

    resumed = launch(model_dir, out, tmp_path / "resumed", "--optimizer", "bootstrap", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rank0, rank1 = reports(tmp_path / "resumed")
    assert list(rank0["program_hashes"]) == ["3"]  # steps 1 and 2 were not redone
    assert rank0["program_hashes"] == rank1["program_hashes"]
    assert rank0["dataset_hashes"] == rank1["dataset_hashes"] == {}
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert [s["kind"] for s in steps] == ["vanilla", "p", "w", "p"]
    demos = json.loads((out / "step_3_p" / "program.json").read_text())["predict"]["demos"]
    assert len(demos) == 2  # the broadcast program is a real bootstrapped one


def test_callback_on_two_ranks_splits_the_calls_and_agrees(model_dir, tmp_path):
    run = launch(model_dir, tmp_path / "out", tmp_path / "reports", "--callback")
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = reports(tmp_path / "reports")
    assert rank0["world_size"] == rank1["world_size"] == 2
    # Rounds at the start and after epochs 1 and 2; every rank has the same scores, rows and broadcast program.
    assert [h["epoch"] for h in rank0["history"]] == [0, 1, 2]
    assert rank0["history"] == rank1["history"] and rank0["history"][0]["rows"] > 0
    assert rank0["rows"] == rank1["rows"] and rank0["final_program"] == rank1["final_program"]
    assert rank0["demos"] == [2]
    assert rank0["global_step"] == rank1["global_step"] > 0
    # Valset scoring (8 examples x 3 rounds) and trace collection (10 x 2 rounds) were split in halves.
    assert rank0["program_calls"] == rank1["program_calls"] == (3 * 8 + 2 * 10) // 2
