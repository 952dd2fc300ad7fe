"""The Hugging Face Hub round trip of a BetterTogether result.

A result is two things that only work together: the trained weights (usually a LoRA adapter) and the optimized
program (instructions and demos of every module). A pushed repository holds both, flat at its root:

    adapter_model.safetensors, adapter_config.json   (or config.json + model*.safetensors for a full model)
    tokenizer files
    program.json          the optimized program, DSPy's JSON save format (never a pickle)
    bettertogether.json   what `load_program` needs: base model, weights kind, task, generation settings
    results.md, results.json, README.md (the model card)

`BetterTogetherTrainer.push_to_hub` writes and uploads them; `load_program` reads them back from a local folder or a
Hub id and returns the program bound to an in-process LM of the model, ready to call. Nothing it reads can run code:
the program is JSON checked against the program's own modules, weights are safetensors only, and no pickle, `.bin`
or Python file is ever downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dspy
import httpx2
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from bt_trl.core.data import read_json_file
from bt_trl.core.live import serve_program
from bt_trl.core.results import STATE_FILE, RunState, results_markdown
from bt_trl.core.runner import default_adapter
from bt_trl.serving.engine import TransformersBackend, lm_name, weights_fingerprint
from bt_trl.serving.models import (
    EMBEDDED_PREFIX,
    check_local_path,
    check_model_name_or_path,
    embedded_model,
    embedded_name,
    resolve_model_name_or_path,
)
from bt_trl.serving.settings import GenerationSettings
from bt_trl.serving.structured import structured_adapter
from bt_trl.tasks import get_task

PROGRAM_FILE = "program.json"
METADATA_FILE = "bettertogether.json"
CARD_FILE = "README.md"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# The files of a run folder that are pushed and downloaded: weights as safetensors, JSON (configs, tokenizer, program,
# results), chat templates, vocabularies, markdown. Pickles (training_args.bin, *.pt, *.pkl) and code never match.
HUB_FILE_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.md")
# The state a DSPy `Predict` saves; `lm` must be null: a program file does not choose where its calls go.
PREDICTOR_STATE_KEYS = {"traces", "train", "demos", "signature", "lm", "fields"}

BETTERTOGETHER_CITATION = """\
@article{soylu2024bettertogether,
  title   = {{Fine-Tuning and Prompt Optimization: Two Great Steps that Work Better Together}},
  author  = {Soylu, Dilara and Potts, Christopher and Khattab, Omar},
  journal = {arXiv preprint arXiv:2407.10930},
  year    = {2024}
}"""


class HubError(RuntimeError):
    """A push to or a download from the Hugging Face Hub failed. The message names the cause and what to do."""


@dataclass
class RunMetadata:
    """`bettertogether.json`: what `load_program` needs besides the weights and `program.json`."""

    weights: str  # "adapter" (PEFT adapter on `base_model`) or "full" (the folder holds the whole model)
    base_model: str | None  # Hub id or path the weights started from; "embedded:<name>" for an embedded model
    task: str | None  # a `bt_trl.tasks` name whose `program()` is the program's skeleton; None for user programs
    strategy: str
    best_step: int
    best_val_score: float
    max_tokens: int
    temperature: float
    format_version: int = 1
    structured_generation: bool = True  # every call generated inside its adapter's output format
    adapter: str = "ChatAdapter"  # class name of the adapter the steps ran the program with (runner.configured_adapter)

    def save(self, folder: str | Path) -> None:
        (Path(folder) / METADATA_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> RunMetadata | None:
        path = Path(folder) / METADATA_FILE
        if not path.exists():
            return None  # a run folder that was never pushed: load_program falls back to adapter_config.json
        data = read_json_file(path, "the run's metadata, a JSON object written by BetterTogetherTrainer")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the run's metadata is a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} (written by a newer bt_trl?)")
        return cls(**data)


def portable_model_id(name_or_path: str | None) -> str | None:
    """The name to record for the model a run started from: an embedded model's cache folder is its `embedded:` name
    (it resolves on any machine); Hub ids and other paths are kept as they are."""
    if not name_or_path:
        return None
    return embedded_name(name_or_path) or name_or_path


def card_base_model(base_model: str | None) -> str | None:
    """The Hub id for the card's `base_model` field (the Hub links the repository to it); None for a local path.
    An embedded model is a de-quantized GGUF of a Hub model: the card names that one."""
    if base_model is not None and base_model.startswith(EMBEDDED_PREFIX):
        return embedded_model(base_model).source
    if base_model is None or Path(base_model).expanduser().exists():
        return None
    return base_model


# ----------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------

def _retry_hint(output_dir: str | Path) -> str:
    return (f"The run's files are intact in {output_dir}; once fixed, push them with trainer.push_to_hub() "
            f"or `hf upload <repo_id> {output_dir}`.")


def resolve_token(token: str | None, output_dir: str | Path) -> str:
    """`token`, else the logged-in one (HF_TOKEN or `hf auth login`); a clear error when there is none or the Hub is
    switched off, before any request is made."""
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1). Unset it to push. "
                       f"{_retry_hint(output_dir)}")
    token = token or get_token()
    if not token:
        raise HubError("Cannot push to the Hub: no Hugging Face token. Log in with `hf auth login`, set HF_TOKEN, or "
                       f"pass hub_token= in the config (a token with write access). {_retry_hint(output_dir)}")
    return token


@contextmanager
def hub_errors(action: str, output_dir: str | Path | None = None) -> Iterator[None]:
    """Turns the failures of a Hub request into a `HubError` naming the cause and what to do."""
    hint = f" {_retry_hint(output_dir)}" if output_dir is not None else ""
    try:
        yield
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            cause = (f"the Hub refused the token (HTTP {status}): use a token with write access to the repository"
                     )
        elif status == 404:
            cause = "not found (HTTP 404): check the repository id, the revision and that the token can read it"
        else:
            cause = f"the Hub answered HTTP {status}: {exc.server_message or exc}; try again later"
        raise HubError(f"{action} failed at {constants.ENDPOINT}: {cause}.{hint}") from exc
    except HFValidationError as exc:
        raise HubError(f"{action} failed: not a Hub id, nor a local folder ({exc})") from exc
    except OfflineModeIsEnabled as exc:
        raise HubError(f"{action} failed: offline mode is on (HF_HUB_OFFLINE=1); unset it.{hint}") from exc
    except (httpx2.TransportError, OSError) as exc:
        raise HubError(f"{action} failed: cannot reach the Hub at {constants.ENDPOINT} ({exc!r}); check the "
                       f"network connection or HF_ENDPOINT.{hint}") from exc


def hub_api() -> HfApi:
    return HfApi(library_name="bt_trl", library_version=version("bt_trl"))


def create_repo(repo_name: str, token: str, private: bool | None, output_dir: str | Path) -> str:
    """Creates the model repository (or finds it) and returns its full id (`namespace/name`)."""
    with hub_errors(f"Creating the Hub repository {repo_name}", output_dir):
        return hub_api().create_repo(repo_name, token=token, private=private, exist_ok=True).repo_id


def pushed_files(folder: str | Path) -> list[Path]:
    """The files of a run folder that go to the Hub: its top-level weights, tokenizer, program, results and card.
    Step folders and checkpoints stay local; so do the resume state (it points at them) and every pickle."""
    return sorted(
        path for path in Path(folder).iterdir()
        if path.is_file() and path.name != STATE_FILE and any(fnmatch(path.name, p) for p in HUB_FILE_PATTERNS)
    )


def upload_run(folder: str | Path, repo_id: str, token: str, commit_message: str, revision: str | None = None):
    """One commit of `pushed_files(folder)` to `repo_id`. Returns huggingface_hub's `CommitInfo`."""
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in
                  pushed_files(folder)]
    with hub_errors(f"Uploading {folder} to {repo_id}", folder):
        return hub_api().create_commit(repo_id, operations, commit_message=commit_message, token=token,
                                       revision=revision)


CARD_TEMPLATE = """\
---
{{ card_data }}
---

# {{ model_name }}

A [DSPy](https://dspy.ai) program optimized **together with the weights** of its language model by
BetterTogether ([Soylu, Potts, Khattab, 2024](https://huggingface.co/papers/2407.10930)): prompt optimization
(few-shot demos bootstrapped on the current weights) alternating with fine-tuning on the program's own passing traces,
with [bt_trl](https://github.com/huggingface/trl)'s `BetterTogetherTrainer` (a TRL `SFTTrainer`).

This repository holds both halves, which only work together: the {{ weights_description }} and `program.json`, the
optimized program (instructions and demos of every module, DSPy's JSON format).

## How to load

```python
import bt_trl

{% if task %}program = bt_trl.load_program("{{ repo_id }}")      # the {{ task }} program of bt_trl.tasks
{% else %}program = bt_trl.load_program("{{ repo_id }}", program=MyProgram())  # the program class that was trained
{% endif %}prediction = program(**inputs)                          # generates with the model, in process
```

`load_program` downloads the repository, loads {{ load_description }}, fills the program's modules from
`program.json` (JSON only: nothing in it runs code) and serves their LM calls from the model.

## Results

Strategy `{{ strategy }}`; the pushed weights and program are those of step {{ best_step }} ({{ best_kind }}), the best
on the validation set ({{ best_score }}). Scores are percentages of the validation set; the pass rate is the share of
training examples whose trace passed the metric in a `w` step (those traces are what it trained on).

{{ results_table }}
## Training configuration

| setting | value |
|---|---|
{% for name, value in config_rows %}| {{ name }} | {{ value }} |
{% endfor %}
## Framework versions

{% for name, value in versions %}- {{ name }}: {{ value }}
{% endfor %}
## Citation

```bibtex
{{ citation }}
```
"""


def model_card(metadata: RunMetadata, state: RunState, repo_id: str, model_name: str,
               config_rows: list[tuple[str, Any]], tags: list[str]) -> ModelCard:
    """The repository's README: metadata (base model, library, tags) for the Hub, the results of every step, the key
    configuration and how to load the program."""
    base = card_base_model(metadata.base_model)
    adapter = metadata.weights == "adapter"
    card_data = ModelCardData(
        base_model=base, library_name="peft" if adapter else "transformers", model_name=model_name,
        pipeline_tag="text-generation", tags=tags,
    )
    best = state.steps[metadata.best_step]
    base_text = f"`{metadata.base_model}`" if metadata.base_model else "the base model"
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, model_name=model_name, repo_id=repo_id, task=metadata.task,
        weights_description=f"LoRA adapter for {base_text}" if adapter else "fine-tuned model",
        load_description=f"{base_text} with the adapter" if adapter else "the model",
        strategy=metadata.strategy, best_step=best.index, best_kind=best.kind,
        best_score=f"{best.val_score:.1f}", results_table=results_markdown(state), config_rows=config_rows,
        versions=[(name, version(name)) for name in ("bt_trl", "trl", "transformers", "peft", "dspy", "torch")],
        citation=BETTERTOGETHER_CITATION,
    )


def save_program(program: dspy.Module, path: str | Path) -> None:
    """`program`'s state as DSPy JSON, without its LM (the loader binds its own)."""
    unbound = program.deepcopy()
    unbound.set_lm(None)
    unbound.save(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------------

def load_program(repo_id_or_path: str | Path, program: dspy.Module | None = None, *, base_model=None,
                 revision: str | None = None, token: str | None = None, device: str | torch.device | None = None,
                 settings: GenerationSettings | None = None, adapter: dspy.Adapter | None = None) -> dspy.Module:
    """A pushed BetterTogether program, bound to an in-process LM of its trained model, ready to call.

    Args:
        repo_id_or_path: a local folder (a pushed repository's files, or the `output_dir` of a finished run) or a
            Hub model id, downloaded with `snapshot_download` (only safetensors, JSON, tokenizer and markdown files).
        program: an instance of the program that was trained (same modules); its prompts and demos are replaced by
            the optimized ones (the instance itself is not modified). May be omitted when the run came from a
            `bt_trl.tasks` task: the repository records its name, and the task's `program()` is built with its
            default options (HotPotQA: the BM25 retriever over its Hub dataset; pass `program=` for another).
        base_model: for an adapter, the base model (id, path or a loaded `PreTrainedModel`, to which the adapter is
            added). Default: the one the run recorded.
        revision, token: of the Hub repository.
        device: where the model runs; default CUDA when available, else CPU.
        settings: generation settings; default the run's max tokens, temperature and structured generation.
        adapter: the adapter to run the program with; default the one the run's steps used (DSPy's ChatAdapter,
            without its JSON fallback, or the DSPy adapter the run was configured with). A run trained with an
            adapter class of your own needs an instance of it here.

    The program behaves as in the run's steps (`runner.served_program`): every call under that adapter and those
    settings, whatever `dspy.settings` hold; an output that cannot be parsed raises `runner.ModuleParseError` (an
    `AdapterParseError`) naming the module and field. `program.close()`, or leaving `with load_program(...) as
    program:`, stops its generation worker.

    Nothing read can run code: `program.json` is parsed as JSON and must match the program's modules (a module
    that names its own LM is refused), weights are loaded from safetensors only, and remote code is never trusted.
    """
    folder = _local_folder(repo_id_or_path, revision, token)
    metadata = RunMetadata.load(folder)
    adapter = adapter or _run_adapter(metadata)
    skeleton = _program_skeleton(program, metadata, repo_id_or_path)
    load_program_state(skeleton, folder / PROGRAM_FILE)
    model, tokenizer = _load_model(folder, metadata, base_model)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if settings is None:
        settings = GenerationSettings() if metadata is None else GenerationSettings(
            max_tokens=metadata.max_tokens, temperature=metadata.temperature,
            structured=metadata.structured_generation,
        )
    name = lm_name(model, weights_fingerprint(model, only_trainable=False))
    return serve_program(skeleton, TransformersBackend(model, tokenizer), name, settings, structured_adapter(adapter))


def _run_adapter(metadata: RunMetadata | None) -> dspy.Adapter:
    """The adapter the run's steps used, rebuilt from its recorded class name (DSPy's own adapters only)."""
    name = metadata.adapter if metadata else "ChatAdapter"
    if name == "ChatAdapter":
        return default_adapter()
    adapter_class = getattr(dspy, name, None)
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, dspy.Adapter)):
        raise ValueError(f"the run was trained with the adapter {name}, which is not one of DSPy's: pass "
                         f"adapter={name}(...) to load_program")
    return adapter_class()


def load_program_state(program: dspy.Module, path: Path) -> None:
    """Loads a DSPy JSON program file into `program`, after checking it only holds what a program's modules save.

    `dspy.Module.load` is not used: it also accepts pickles, and it would set any attribute the file names on the
    modules. Here the file is parsed as JSON, its modules must be exactly the program's, each with only the keys
    a `Predict` saves, no LM, and as many signature fields as the module has.
    """
    program.load_state(program_state(program, checked_program_state(program, path)))


def is_single_predictor(program: dspy.Module) -> bool:
    """A program that is itself one `Predict` (its only module is named "self"): DSPy saves its state at the top
    level of the file, not under a module name."""
    return [module for _, module in program.named_parameters()] == [program]


def program_state(program: dspy.Module, module_states: dict) -> dict:
    """What `program.load_state` takes for these module states (by module name, as `checked_program_state` gives)."""
    return module_states["self"] if is_single_predictor(program) else module_states


def checked_program_state(program: dspy.Module, path: Path, check_lm=None) -> dict:
    """The module states of the DSPy JSON program file `path` by module name, checked against `program` (see
    `load_program_state`). A module state naming an LM is refused, unless `check_lm(module_name, lm_state)` is given
    and accepts it (it raises ValueError otherwise)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a BetterTogether repository holds its program in {PROGRAM_FILE}")
    state = read_json_file(path, "a DSPy JSON program file, as program.save('program.json') and a BetterTogether run "
                                 "write it")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: a DSPy program file is a JSON object, got {type(state).__name__}")
    modules = dict(program.named_parameters())
    if is_single_predictor(program):
        state = {"self": {key: value for key, value in state.items() if key != "metadata"}}
    saved = {name for name in state if name != "metadata"}
    if saved != set(modules):
        raise ValueError(f"{path} holds modules {sorted(saved)}; the program has {sorted(modules)}: pass the program "
                         f"that was trained as program=")
    for name, module in modules.items():
        module_state = state[name]
        if not isinstance(module_state, dict):
            raise ValueError(f"{path}: module {name!r} is not a JSON object")
        unknown = set(module_state) - PREDICTOR_STATE_KEYS
        if unknown:
            raise ValueError(f"{path}: module {name!r} has keys a DSPy module does not save: {sorted(unknown)}")
        if module_state.get("lm") is not None:
            if check_lm is None:
                raise ValueError(f"{path}: module {name!r} names its own LM; a program file must not choose where "
                                 f"its calls go (the loader serves them from the pushed model)")
            check_lm(name, module_state["lm"])
        fields = module_state.get("signature", {}).get("fields", [])
        if len(fields) != len(module.signature.fields):
            raise ValueError(f"{path}: module {name!r} has {len(fields)} signature fields, the program's has "
                             f"{len(module.signature.fields)}: pass the program that was trained as program=")
    return {name: state[name] for name in modules}


def _local_folder(repo_id_or_path: str | Path, revision: str | None, token: str | None) -> Path:
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file: load_program reads a run folder (a finished run's output_dir, "
                                 f"holding {PROGRAM_FILE} and the weights) or a Hub id")
    check_local_path(str(repo_id_or_path), "run folder")
    with hub_errors(f"Downloading {repo_id_or_path} (no local folder has this name)"):
        return Path(snapshot_download(str(repo_id_or_path), revision=revision, token=token,
                                      allow_patterns=list(HUB_FILE_PATTERNS)))


def _program_skeleton(program: dspy.Module | None, metadata: RunMetadata | None, source) -> dspy.Module:
    if program is not None:
        if not isinstance(program, dspy.Module):
            raise TypeError(f"program must be a dspy.Module, got {type(program).__name__}")
        return program.deepcopy()
    if metadata is None or metadata.task is None:
        raise ValueError(f"{source} records no bt_trl task to rebuild its program from: pass program=<an instance of "
                         f"the program that was trained>")
    return get_task(metadata.task).program()  # get_task only accepts the names bt_trl ships


def _load_model(folder: Path, metadata: RunMetadata | None, base_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists():
        if not (folder / ADAPTER_WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS_FILE} (only safetensors weights are loaded)")
        if base_model is None:
            base_model = (metadata.base_model if metadata else None) or json.loads(
                adapter_config.read_text()).get("base_model_name_or_path")
        if base_model is None:
            raise ValueError(f"{folder} records no base model for its adapter: pass base_model=")
        if not isinstance(base_model, PreTrainedModel):
            check_model_name_or_path(base_model)
            base_model = AutoModelForCausalLM.from_pretrained(resolve_model_name_or_path(base_model),
                                                              use_safetensors=True)
        model = PeftModel.from_pretrained(base_model, str(folder))
        tokenizer_source = folder if (folder / "tokenizer_config.json").exists() else base_model.name_or_path
    else:
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"{folder} holds neither an adapter nor safetensors model weights")
        model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
        tokenizer_source = folder
    return model, AutoTokenizer.from_pretrained(str(tokenizer_source))
