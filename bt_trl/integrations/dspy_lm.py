"""bt_trl from DSPy: a `dspy.LM` served in process from a local model, with a fine-tuning and reinforcement-learning
provider that DSPy's own weight optimizers (`dspy.BootstrapFinetune`, `dspy.BetterTogether`, `GRPO`) use unchanged.

    lm = bt_trl.lm("embedded:smollm2-135m")       # or a Hub id, or a local folder
    program.set_lm(lm)
    dspy.BootstrapFinetune(metric=metric).compile(program, trainset=trainset)

Three pieces:

* `ModelEngine`, a `BatchingEngine` (DSPy 3.4 custom engine) that serves every weights version of one base model: the
  base weights and each fine-tuned version, a LoRA adapter (all adapters live in one `PeftModel`) or a full model.
  DSPy caches answers by LM name, so each version has its own name (a hash of its weights) and a request is
  generated with the version its LM names. Requests of different versions go to separate batches.
* `ModelProvider`, DSPy's `Provider` interface: `finetune` trains a new version with TRL's `SFTTrainer` in this process
  on DSPy's chat-format data and returns its name, which the same engine serves at once (`LM.finetune` hands DSPy
  `lm.copy(model=<that name>)`); `reinforce` returns a `ModelReinforceJob`, whose steps train new versions with TRL's
  GRPO loss on DSPy's groups; `kill` frees the model, `launch` loads it again (a call to a killed LM does too).
* `load_dspy_program`, the safe way back from `program.save(path)`: DSPy stores this LM's state in the program file, and
  loading it goes through JSON checks and safetensors only (no pickle, no class named by the file is imported).

Structured generation is the engine's: it declares `response_format` support, so DSPy's JSONAdapter (and ChatAdapter's
JSON fallback) ask for their schema; `bt_trl.structured_adapter(dspy.ChatAdapter())` sends ChatAdapter's own format.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import dspy
import torch
from dspy.clients.provider import Provider, ReinforceJob, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat, get_finetune_directory
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from bt_trl.config import BetterTogetherConfig
from bt_trl.integrations.hub import ADAPTER_WEIGHTS_FILE, checked_program_state, portable_model_id, program_state
from bt_trl.serving.engine import (
    LM_PREFIX,
    BatchingEngine,
    Generation,
    GenerationSettings,
    SamplingParams,
    TransformersBackend,
    weights_fingerprint,
)
from bt_trl.serving.models import EMBEDDED_MODEL, check_model_name_or_path, resolve_model_name_or_path
from bt_trl.steps.grpo import group_advantages, reinforce_on
from bt_trl.steps.sft import FORMAT_ROW, chat_row, finetune_on, rows_to_dataset

logger = logging.getLogger(__name__)

# train_kwargs that choose LoRA or full fine-tuning: TRL's ModelConfig fields, as in `scripts/train.py`.
LORA_KWARGS = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
DEFAULT_GROUPS_PER_STEP = 4  # the groups a reinforce job's step asks DSPy for, unless train_kwargs say otherwise
# The project's defaults for DSPy's fine-tuning jobs, on top of BetterTogetherConfig's (the w step's) SFT defaults:
# LoRA as in the README's Python API, no checkpoints (the engine saves each version), no logging integrations.
DEFAULT_TRAIN_KWARGS = {
    "use_peft": True, "lora_r": 32, "lora_alpha": 64, "lora_target_modules": ["all-linear"],
    "save_strategy": "no", "report_to": "none",
}
BASE, ADAPTER, FULL = "base", "adapter", "full"
# The engine class path DSPy records in a program file; the only one `load_dspy_program` accepts.
ENGINE_CLASS = "bt_trl.integrations.dspy_lm:ModelEngine"
ENGINE_CLASSES = (ENGINE_CLASS, "bt_trl.dspy_lm:ModelEngine")  # and where program files saved before 0.2 name it
# The LM state keys `program.save` writes for this LM (DSPy's `LM.dump_state`); anything else is refused on load.
LM_STATE_KEYS = {
    "_dspy_lm_class", "model", "model_type", "cache", "num_retries", "temperature", "max_tokens", "engine",
    "finetuning_model", "launch_kwargs", "train_kwargs", "rollout_id", "top_p", "stop",
}


def lm(model: str = EMBEDDED_MODEL, *, max_tokens: int = 256, temperature: float = 0.0, batch_size: int = 8,
       batch_wait: float = 0.02, structured: bool = True, train_kwargs: dict[str, Any] | None = None,
       device: str | None = None, output_dir: str | None = None, cache: bool = True) -> dspy.LM:
    """A `dspy.LM` generating in process from `model`, fine-tunable by DSPy's weight optimizers.

    Args:
        model: `embedded:<name>` (see `bt_trl.serving.models`), a Hub id or a local folder (safetensors weights only).
        max_tokens, temperature: the LM's defaults, as for `dspy.LM`.
        batch_size, batch_wait: concurrent calls are generated together, up to `batch_size`; a batch starts once no
            request has arrived for `batch_wait` seconds.
        structured: generate each call inside the output format it asks for (`response_format`, see
            `bt_trl/serving/structured.py`); the engine then declares `response_format` support.
        train_kwargs: defaults of `finetune` jobs: any `SFTConfig` field, and `use_peft` (default True), `lora_r`,
            `lora_alpha`, `lora_dropout`, `lora_target_modules` (TRL's `ModelConfig` names). The project's SFT
            defaults apply below them (`BetterTogetherConfig`: completion-only loss, learning rate 1e-4, ...).
        device: where the model runs and trains; default CUDA when available, else CPU.
        output_dir: where fine-tuned versions are saved (one folder each); default DSPy's fine-tuning folder
            (`$DSPY_FINETUNEDIR`, else `<DSPy cache>/finetune`) + `/bt_trl`.
        cache: DSPy's answer cache (safe: each weights version has its own LM name).

    The model is loaded now and stays loaded until `lm.kill()`.
    """
    check_model_name_or_path(model)
    train_kwargs = dict(train_kwargs or {})
    check_train_kwargs(train_kwargs)
    source = model if model.startswith("embedded:") or not Path(model).exists() else str(Path(model).resolve())
    engine = ModelEngine(
        portable_model_id(source),
        GenerationSettings(max_tokens, temperature, batch_size, batch_wait, structured),
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        output_dir=str(Path(output_dir or Path(get_finetune_directory()) / "bt_trl").resolve()),
    )
    return engine.dspy_lm(engine.base_version(), train_kwargs=train_kwargs, cache=cache)


def check_train_kwargs(train_kwargs: dict[str, Any]) -> None:
    """A clear error for a train_kwargs key that configures nothing, before any model work."""
    known = {f.name for f in fields(SFTConfig)} | set(LORA_KWARGS)
    unknown = sorted(set(train_kwargs) - known)
    if unknown:
        raise ValueError(f"unknown train_kwargs {unknown}: use SFTConfig fields or {', '.join(LORA_KWARGS)}")


@dataclass
class Version:
    """One weights version the engine serves."""

    kind: str  # BASE, ADAPTER (a LoRA adapter on the base model) or FULL (a whole model)
    folder: str | None = None  # where its weights are saved (None for the base: they are the model's own)


class ModelEngine(BatchingEngine):
    """A DSPy custom engine serving every weights version of one base model, each under its own LM name.

    The model is loaded on first use and kept until `release()`; adapters and full versions are loaded from their
    folders when first requested. Training a new version (`finetune`) holds the model: requests wait meanwhile.
    """

    def __init__(self, model: str, settings: GenerationSettings, *, device: str, output_dir: str,
                 versions: dict[str, Version] | None = None):
        super().__init__(backend=None, max_batch_size=settings.max_batch_size, batch_wait=settings.batch_wait,
                         default_max_tokens=settings.max_tokens, structured_outputs=settings.structured)
        self.model_name_or_path = model  # portable: `embedded:<name>`, a Hub id or an absolute path
        self.settings = settings
        self.device = device
        self.output_dir = output_dir
        self.versions: dict[str, Version] = dict(versions or {})
        self._model_lock = threading.RLock()
        self._model = None  # the base model, a PeftModel once an adapter is loaded
        self._tokenizer = None
        self._adapter_names: dict[str, str] = {}  # version name -> the PEFT adapter name it is loaded under
        self._adapter_numbers = itertools.count(1)
        self._full_models: dict[str, Any] = {}
        self._backends: dict[str, TransformersBackend] = {}  # per version: each keeps its own prefix KV cache

    # -- the LM --------------------------------------------------------------------------------------------------

    def dspy_lm(self, name: str, **kwargs) -> dspy.LM:
        """A `dspy.LM` served by this engine with the weights version `name`, fine-tunable through `ModelProvider`."""
        defaults = {"max_tokens": self.settings.max_tokens, "temperature": self.settings.temperature,
                    "num_retries": 0}  # a failed generation is a fault of this process, not a transient one
        return dspy.LM(name, engine=self, provider=ModelProvider(self), **{**defaults, **kwargs})

    def base_version(self) -> str:
        """The LM name of the base weights (loading the model to name them, the first time)."""
        base = next((name for name, v in self.versions.items() if v.kind == BASE), None)
        if base is None:
            with self._model_lock:
                model = self._loaded()
                stem = Path(str(model.config._name_or_path)).name
                base = f"{LM_PREFIX}{stem}-{weights_fingerprint(model, only_trainable=False)}"
                self.versions[base] = Version(BASE)
        return base

    # -- serving -------------------------------------------------------------------------------------------------

    def _generate(self, model: str, prompts: list[list[dict]], params: list[SamplingParams]) -> list[Generation]:
        version = self.versions.get(model)
        if version is None:
            raise ValueError(f"{model} is not a weights version of this engine (it serves {sorted(self.versions)})")
        with self._model_lock:
            served = self._served_model(model, version)
            backend = self._backends.get(model)
            if backend is None or backend.model is not served:  # the base model is wrapped once adapters exist
                backend = self._backends[model] = TransformersBackend(served, self._tokenizer)
            if version.kind == BASE and isinstance(served, PeftModel):
                with served.disable_adapter():
                    return backend.generate(prompts, params)
            return backend.generate(prompts, params)

    def _served_model(self, name: str, version: Version):
        """The model that generates version `name`, with the version's weights in force."""
        model = self._loaded()
        if version.kind == FULL:
            if name not in self._full_models:
                self._full_models[name] = self._load_full(version.folder)
            return self._full_models[name]
        if version.kind == ADAPTER:
            if name not in self._adapter_names:
                model = self._load_adapter(name, version.folder)
            model.set_adapter(self._adapter_names[name])
        return model

    # -- loading and freeing -------------------------------------------------------------------------------------

    def _loaded(self):
        """The base model (and tokenizer), loaded from `model_name_or_path` the first time (safetensors only)."""
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = resolve_model_name_or_path(self.model_name_or_path)
            logger.info("Loading %s on %s", self.model_name_or_path, self.device)
            self._model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).to(self.device).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(path)
        return self._model

    def _load_adapter(self, name: str, folder: str):
        _check_adapter_folder(folder)
        adapter = self._new_adapter_name()
        if isinstance(self._model, PeftModel):
            self._model.load_adapter(folder, adapter_name=adapter)
        else:
            self._model = PeftModel.from_pretrained(self._model, folder, adapter_name=adapter)
        self._model.eval()
        self._adapter_names[name] = adapter
        return self._model

    def _load_full(self, folder: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).to(self.device).eval()

    def _new_adapter_name(self) -> str:
        return f"v{next(self._adapter_numbers)}"

    def load(self) -> None:
        """Loads the base model now (versions are loaded when first requested)."""
        with self._model_lock:
            self._loaded()

    def release(self) -> None:
        """Frees the model, every loaded version and the generation worker; the next request loads them again."""
        self.close()
        with self._model_lock:
            self._model = self._tokenizer = None
            self._adapter_names.clear()
            self._full_models.clear()
            self._backends.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- fine-tuning ---------------------------------------------------------------------------------------------

    def finetune(self, source: str, rows: list[dict], train_kwargs: dict[str, Any]) -> str:
        """Trains a new version from version `source` on prompt/completion `rows` (see `steps.sft.chat_row`) and
        returns its LM name. LoRA (`use_peft`, the default): a new adapter, starting from `source`'s adapter when it
        has one (whose LoRA configuration it keeps), else fresh. Full: a copy of `source`'s whole model."""
        dataset = rows_to_dataset(rows)
        return self._train_version(source, train_kwargs, lambda trainer, folder: finetune_on(trainer, dataset, folder))

    def reinforce(self, source: str, rows: list[dict], advantages: list[float], temperature: float,
                  iterations: int, train_kwargs: dict[str, Any]) -> str:
        """Trains a new version from version `source` on sampled prompt/completion `rows` with their GRPO
        `advantages` (TRL's GRPO loss at the sampling `temperature`, `iterations` passes: `steps.grpo.reinforce_on`),
        as `finetune` trains on rows, and returns its LM name."""
        dataset = rows_to_dataset(rows).add_column("advantage", advantages)
        return self._train_version(
            source, train_kwargs,
            lambda trainer, folder: reinforce_on(trainer, dataset, folder, temperature, iterations),
        )

    def _train_version(self, source: str, train_kwargs: dict[str, Any],
                       train: Callable[[SFTTrainer, str], object]) -> str:
        """A new version trained from version `source` by `train(trainer, output_dir)`, saved and served; its name."""
        options = {**DEFAULT_TRAIN_KWARGS, **train_kwargs}
        check_train_kwargs(options)
        lora = ModelConfig(**{k: options.pop(k) for k in LORA_KWARGS if k in options})
        version = self.versions.get(source)
        if version is None:
            raise ValueError(f"{source} is not a weights version of this engine (it serves {sorted(self.versions)})")
        if lora.use_peft and version.kind == FULL:
            raise ValueError(f"{source} is a fully fine-tuned model; LoRA trains on the base model's versions only: "
                             f"fine-tune it with train_kwargs use_peft=False")
        with self._model_lock:
            if lora.use_peft:
                model, adapter = self._new_trainable_adapter(source, version, get_peft_config(lora))
            else:
                model, adapter = self._full_copy(version), None
            # The project's SFT defaults are the w step's (BetterTogetherConfig; its BetterTogether fields are unused).
            args = BetterTogetherConfig(**{
                "output_dir": str(Path(self.output_dir) / "runs" / source.removeprefix(LM_PREFIX)),
                "use_cpu": torch.device(self.device).type == "cpu", **options,
            })
            use_cache = model.config.use_cache
            try:
                trainer = SFTTrainer(model=model, args=args, train_dataset=rows_to_dataset([FORMAT_ROW]),
                                     processing_class=self._tokenizer)
                train(trainer, args.output_dir)
            except BaseException:
                if adapter is not None:
                    model.delete_adapter(adapter)
                raise
            finally:
                # Gradient checkpointing turns the KV cache off; generation would silently get much slower.
                if args.gradient_checkpointing:
                    model.gradient_checkpointing_disable()
                model.config.use_cache = use_cache
                model.eval()
            del trainer
            # The name hashes what was trained: the new adapter (the only trainable weights) or the whole model.
            name = f"{self.base_version()}-{weights_fingerprint(model, only_trainable=True)}"
            folder = Path(self.output_dir) / name.removeprefix(LM_PREFIX)
            folder.mkdir(parents=True, exist_ok=True)
            if adapter is not None:
                save_file(get_peft_model_state_dict(model, adapter_name=adapter), str(folder / ADAPTER_WEIGHTS_FILE))
                model.peft_config[adapter].save_pretrained(str(folder))
                self._adapter_names[name] = adapter
                self.versions[name] = Version(ADAPTER, str(folder))
            else:
                model.save_pretrained(str(folder), safe_serialization=True)
                self._tokenizer.save_pretrained(str(folder))
                self._full_models[name] = model
                self.versions[name] = Version(FULL, str(folder))
        logger.info("Trained %s into %s (saved in %s)", source, name, folder)
        return name

    def unload(self, name: str) -> None:
        """Frees the memory of version `name` (an adapter or a full model); it is loaded again from its folder when
        next requested."""
        with self._model_lock:
            adapter = self._adapter_names.pop(name, None)
            if adapter is not None:
                self._model.delete_adapter(adapter)
            self._full_models.pop(name, None)
            self._backends.pop(name, None)

    def _full_copy(self, version: Version):
        """A separate, trainable copy of a version's whole model (an adapter merged into the base weights)."""
        if version.kind == FULL:
            return self._load_full(version.folder)
        model = self._load_full(resolve_model_name_or_path(self.model_name_or_path))
        if version.kind == ADAPTER:
            _check_adapter_folder(version.folder)
            model = PeftModel.from_pretrained(model, version.folder).merge_and_unload()
        return model

    def _new_trainable_adapter(self, source: str, version: Version, lora_config):
        """The PeftModel with a new adapter, active and the only trainable weights: a copy of `source`'s adapter, or
        a fresh one from `lora_config` for the base version."""
        model = self._served_model(source, version)
        adapter = self._new_adapter_name()
        if version.kind == ADAPTER:
            source_adapter = self._adapter_names[source]
            config = copy.deepcopy(model.peft_config[source_adapter])
            config.inference_mode = False  # a loaded adapter is frozen; its copy is trained
            model.add_adapter(adapter, config)
            set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=source_adapter),
                                      adapter_name=adapter)
        elif isinstance(model, PeftModel):
            model.add_adapter(adapter, lora_config)
        else:
            model = self._model = get_peft_model(model, lora_config, adapter_name=adapter)
        model.set_adapter(adapter)
        return model, adapter

    # -- saving: DSPy's custom-engine state (`program.save`), JSON only ---------------------------------------------

    def dump_state(self) -> dict:
        return {
            "model": self.model_name_or_path,
            "versions": {name: asdict(version) for name, version in self.versions.items()},
            "settings": asdict(self.settings),
            "device": self.device,
            "output_dir": self.output_dir,
        }

    @classmethod
    def load_state(cls, state: dict) -> ModelEngine:
        """The engine `dump_state` described, checked: plain JSON values only; weights are read (safetensors only)
        when first used."""
        expected = {"model", "versions", "settings", "device", "output_dir"}
        if not isinstance(state, dict) or set(state) != expected:
            raise ValueError(f"a bt_trl engine state has the keys {sorted(expected)}, got {state!r}")
        if not all(isinstance(state[key], str) for key in ("model", "device", "output_dir")):
            raise ValueError("a bt_trl engine state's model, device and output_dir are strings")
        versions = {}
        for name, version in dict(state["versions"]).items():
            if set(version) != {"kind", "folder"} or version["kind"] not in (BASE, ADAPTER, FULL) or not (
                version["folder"] is None if version["kind"] == BASE else isinstance(version["folder"], str)
            ):
                raise ValueError(f"invalid weights version {name!r}: {version!r}")
            versions[name] = Version(**version)
        settings = dict(state["settings"])
        if set(settings) != {f.name for f in fields(GenerationSettings)}:
            raise ValueError(f"invalid generation settings {settings!r}")
        check_model_name_or_path(state["model"])
        return cls(state["model"], GenerationSettings(**settings), device=state["device"],
                   output_dir=state["output_dir"], versions=versions)


def _check_adapter_folder(folder: str) -> None:
    """Adapters are read from safetensors only (PEFT would fall back to a pickled `adapter_model.bin`)."""
    if not (Path(folder) / ADAPTER_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS_FILE}: the adapter's weights are missing")


class ModelReinforceJob(ReinforceJob):
    """DSPy's reinforcement-learning job (`LM.reinforce`, what `dspy.GRPO` drives) on a `ModelEngine`, in process and
    synchronous: each `step` trains a new weights version from the LM's current one on the groups it is given, with
    TRL's GRPO loss (advantages as `GRPOTrainer` computes them from each group's rewards; groups without reward
    variance are skipped and counted), and points the LM at it, as DSPy expects (`lm.model` changes in place).

    `train_kwargs`: the fine-tuning options of `bt_trl.lm` (SFTConfig fields, LoRA fields), `groups_per_step`, how
    many groups a step asks for (its `pending_batch_ids`; default 4), and `num_iterations` (TRL's name; default 1),
    the passes of each step's training run over its rows (a new optimizer per step). The rollouts are sampled at the
    LM's temperature, which the loss uses too. The version a step replaces is freed from memory (it stays on disk and
    loads on request).
    """

    def initialize(self) -> None:
        engine: ModelEngine = self.lm.provider.engine
        options = {**(self.lm.train_kwargs or {}), **self.train_kwargs}
        self.groups_per_step = options.pop("groups_per_step", DEFAULT_GROUPS_PER_STEP)
        self.iterations = options.pop("num_iterations", 1)
        options.pop("num_generations", None)  # the groups' own size
        for name, value in (("groups_per_step", self.groups_per_step), ("num_iterations", self.iterations)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_train_kwargs(options)
        self.temperature = self.lm.kwargs.get("temperature") or 0.0
        if self.temperature <= 0:
            raise ValueError(f"GRPO samples its rollouts: give the LM a temperature above 0 (got {self.temperature}), "
                             "e.g. bt_trl.lm(..., temperature=1.0)")
        self.engine, self.options = engine, options
        self.start_model = self.lm.model  # the version the job started from: the caller's, never unloaded
        self.status, self.steps = "running", 0
        self.skipped_groups = 0  # groups without reward variance, over all steps
        self.pending_batch_ids = list(range(self.groups_per_step))

    def get_status(self) -> dict[str, Any]:
        """DSPy's `GRPOStatus`: the batches (one group each) the next step waits for."""
        return {"job_id": f"bt_trl-{id(self):x}", "status": self.status, "current_model": self.lm.model,
                "checkpoints": dict(self.checkpoints), "last_checkpoint": self.last_checkpoint,
                "pending_batch_ids": list(self.pending_batch_ids)}

    def step(self, train_data: list[dict[str, Any]], train_data_format: TrainDataFormat | str | None = None) -> None:
        """Trains on `train_data` (`[{"batch_id": ..., "group": [{"messages", "completion", "reward"}, ...]}]`, DSPy's
        GRPO chat format); bad data fails before training."""
        if train_data_format != TrainDataFormat.GRPO_CHAT:
            raise ValueError(f"a bt_trl reinforce job trains on GRPO chat groups (TrainDataFormat.GRPO_CHAT), got "
                             f"{train_data_format!r}")
        rows, advantages = [], []
        for index, item in enumerate(train_data):
            group = item.get("group") if isinstance(item, dict) else None
            if not group or not all(_is_grpo_chat(member) for member in group):
                raise ValueError(f"train_data[{index}] is not a GRPO group ({{'batch_id', 'group': [{{'messages', "
                                 f"'completion', 'reward'}}, ...]}}): {item!r}")
            group_advantage = group_advantages([float(member["reward"]) for member in group])
            if group_advantage is None:
                self.skipped_groups += 1
                continue
            rows += [chat_row([*member["messages"], member["completion"]]) for member in group]
            advantages += group_advantage
        source = self.lm.model
        if rows:
            self.lm.model = self.engine.reinforce(source, rows, advantages, self.temperature, self.iterations,
                                                  self.options)
            if source != self.start_model:  # a version this job made and moved past
                self.engine.unload(source)
        else:
            logger.warning("GRPO step %d: no group with reward variance (%d given); the weights are unchanged",
                           self.steps + 1, len(train_data))
        self.steps += 1
        self.pending_batch_ids = list(range(self.steps * self.groups_per_step, (self.steps + 1) * self.groups_per_step))

    def save_checkpoint(self, checkpoint_name: str) -> None:
        """Records the current version (already saved in its folder) under `checkpoint_name`."""
        self.checkpoints[checkpoint_name] = self.lm.model
        self.last_checkpoint = checkpoint_name

    def terminate(self) -> None:
        self.status, self.pending_batch_ids = "done", []


def _is_grpo_chat(member) -> bool:
    return (isinstance(member, dict) and {"messages", "completion", "reward"} <= set(member)
            and isinstance(member["messages"], list) and isinstance(member["completion"], dict)
            and isinstance(member["reward"], (int, float)))


class ModelProvider(Provider):
    """DSPy's provider interface for a `ModelEngine`: fine-tuning and reinforcement learning in process, `launch` and
    `kill` load and free the model. `LM.finetune` runs `finetune` in a thread and returns `lm.copy(model=<the new
    name>)`, served by the same engine; `LM.reinforce` returns a `ModelReinforceJob`."""

    def __init__(self, engine: ModelEngine):
        super().__init__()
        self.finetunable = True
        self.reinforceable = True
        self.ReinforceJob = ModelReinforceJob  # the class `LM.reinforce` instantiates
        self.engine = engine

    def __deepcopy__(self, memo):  # DSPy deep-copies programs; the engine (and its model) is shared
        return self

    def launch(self, lm: dspy.LM, launch_kwargs: dict[str, Any] | None = None) -> None:
        self.engine.load()

    def kill(self, lm: dspy.LM, launch_kwargs: dict[str, Any] | None = None) -> None:
        self.engine.release()

    def finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None, train_kwargs: dict[str, Any] | None = None) -> str:
        """Trains on DSPy's chat-format `train_data` (`{"messages": [..., {"role": "assistant", ...}]}` per call, as
        `adapter.format_finetune_data` writes it; the loss goes on the last, assistant message) and returns the new
        version's LM name. Bad data or options fail before any training."""
        if train_data_format != TrainDataFormat.CHAT:
            raise ValueError(f"bt_trl fine-tunes on chat data (TrainDataFormat.CHAT), got {train_data_format!r}")
        if not train_data:
            raise ValueError("no training data: no trace passed the metric, so there is nothing to fine-tune on")
        rows = []
        for index, item in enumerate(train_data):
            messages = item.get("messages") if isinstance(item, dict) else None
            if not messages or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages) or (
                messages[-1]["role"] != "assistant"
            ):
                raise ValueError(f"train_data[{index}] is not a chat ending with the assistant's answer: {item!r}")
            rows.append(chat_row([{"role": m["role"], "content": m["content"]} for m in messages]))
        return self.engine.finetune(model, rows, dict(train_kwargs or {}))


def load_dspy_program(path: str | Path, program: dspy.Module) -> dspy.Module:
    """`program` with the state `program.save(path)` wrote, its LMs (`bt_trl.lm`s) rebuilt and fine-tunable again.

    The file is parsed as JSON and checked (see `integrations.hub.load_program_state`); each module's LM must be a
    `bt_trl.lm` state (DSPy's LM with bt_trl's engine, only the keys DSPy saves for it). No class named by the file
    is imported, nothing is unpickled, weights are read from safetensors only. Modules that shared an LM share one
    engine (one model in memory) again. `program` itself is not modified.
    """
    path = Path(path)

    def check_lm(module: str, lm_state) -> None:
        if not isinstance(lm_state, dict) or set(lm_state) - LM_STATE_KEYS or lm_state.get(
            "_dspy_lm_class"
        ) != "dspy.clients.lm.LM" or not isinstance(lm_state.get("engine"), dict) or lm_state["engine"].get(
            "class"
        ) not in ENGINE_CLASSES or set(lm_state["engine"]) != {"class", "state"}:
            raise ValueError(f"{path}: module {module!r} has an LM that is not a bt_trl.lm; only bt_trl.lm states "
                             f"are loaded (keys {sorted(LM_STATE_KEYS)}, engine {ENGINE_CLASS})")
        check_train_kwargs(lm_state.get("train_kwargs") or {})

    state = checked_program_state(program, path, check_lm)
    loaded = program.deepcopy()
    engines: dict[str, ModelEngine] = {}
    lms = {}
    for name, module_state in state.items():
        lm_state = module_state["lm"]
        if lm_state is not None:
            engine_key = json.dumps(lm_state["engine"]["state"], sort_keys=True)
            if engine_key not in engines:
                engines[engine_key] = ModelEngine.load_state(lm_state["engine"]["state"])
            engine = engines[engine_key]
            if lm_state["model"] not in engine.versions:
                raise ValueError(f"{path}: module {name!r} names {lm_state['model']}, not a version of its engine")
            kwargs = {k: v for k, v in lm_state.items() if k not in ("_dspy_lm_class", "model", "engine")}
            kwargs.pop("num_retries", None)
            lms[name] = engine.dspy_lm(lm_state["model"], **kwargs)
    unbound = {name: {**module_state, "lm": None} for name, module_state in state.items()}
    loaded.load_state(program_state(loaded, unbound))
    for name, predictor in loaded.named_predictors():
        predictor.lm = lms.get(name)
    return loaded

