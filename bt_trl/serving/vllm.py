"""vLLM generation backend for GPU machines (`pip install 'bt_trl[vllm]'`, `generation_backend="vllm"`).

A vLLM `LLM` runs in the training process, on the same GPU (`vllm_gpu_memory_utilization` is the share of GPU memory
it reserves for its weights and KV cache; training uses the rest). It loads the base model once. After a w step it
serves the new weights without reloading the model:

* LoRA (a `PeftModel`): the adapter is saved to a folder of its own and served through a new `LoRARequest` (a new
  adapter id per weights version; vLLM loads the small adapter, the base weights stay in place);
* full fine-tuning: the new parameters are copied into vLLM's model in place (`load_weights`, as TRL's colocated
  GRPO does) and its prefix cache is reset.

It implements the same `GenerationBackend` interface as `TransformersBackend` (same chat template, same stop at the
completion marker, per-request sampling parameters), so DSPy and the trainer see no difference. vLLM's own scheduler
batches the requests of a call continuously and reuses shared prompt prefixes (`enable_prefix_caching`).
Structured generation uses vLLM's structured outputs with its llguidance backend ("guidance") and the same Lark
grammars; vLLM does not close free text early when a row's token budget runs short (`GrammarConstraint` does that
on the transformers backend), so give the fields room with `generation_max_tokens`.

Written against vLLM's documented `LLM` / `SamplingParams` / `LoRARequest` API (the range TRL supports); it cannot
run on CPU-only machines, where selecting it fails at configuration time (`check_vllm_usable`).
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel

from bt_trl.serving.engine import COMPLETION_MARKER, Generation, SamplingParams, encode_chats


def check_vllm_usable() -> None:
    """Raises a clear error, before any model work, when the vLLM backend cannot run on this machine."""
    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append("vLLM is not installed (pip install 'bt_trl[vllm]')")
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible")
    if problems:
        raise ValueError(
            f"generation_backend='vllm' cannot run here: {'; '.join(problems)}. "
            "Use generation_backend='transformers' (the default) on this machine."
        )


class VLLMBackend:
    """Generates with a vLLM engine colocated with training, serving the weights last passed to `load_weights`.

    Args:
        model: the model being trained (unwrapped; a `PeftModel` for LoRA). Its base weights are loaded by vLLM from
            `name_or_path`, so the model must come from a Hub id or a local folder.
        tokenizer: the training tokenizer; its chat template formats the prompts.
        gpu_memory_utilization: share of the GPU's memory vLLM reserves.
        max_model_length: longest prompt + completion vLLM plans for (default: the model's).
        seed: sampling seed.
    """

    def __init__(self, model, tokenizer, gpu_memory_utilization: float = 0.3, max_model_length: int | None = None,
                 seed: int = 0, stop_strings: Sequence[str] = (COMPLETION_MARKER,)):
        check_vllm_usable()
        from vllm import LLM

        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.is_lora = isinstance(model, PeftModel)
        base = model.get_base_model() if self.is_lora else model
        lora = {}
        if self.is_lora:
            lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": max(c.r for c in model.peft_config.values())}
        multi_process = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.llm = LLM(
            model=base.name_or_path,
            dtype=base.dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_length,
            enable_prefix_caching=True,
            seed=seed,
            structured_outputs_config={"backend": "guidance"},  # the grammar library of bt_trl/serving/structured.py
            # Under accelerate launch every rank runs its own engine on its own GPU (TRL's colocate mode).
            distributed_executor_backend="external_launcher" if multi_process else None,
            **lora,
        )
        self.lora_request = None
        self.served_version: str | None = None
        self._adapter_ids: dict[str, int] = {}
        self._adapters = tempfile.TemporaryDirectory(prefix="bt_trl-vllm-adapters-")

    def load_weights(self, model, version: str) -> None:
        """Serves `model`'s current weights from now on. `version` names them (the DSPy LM name: identical weights,
        identical name), so serving a version already loaded costs nothing."""
        if version == self.served_version:
            return
        if self.is_lora:
            from vllm.lora.request import LoRARequest

            folder = Path(self._adapters.name) / version
            if version not in self._adapter_ids:
                model.save_pretrained(str(folder))  # the adapter only, a few MB
                self._adapter_ids[version] = len(self._adapter_ids) + 1  # vLLM adapter ids start at 1
            self.lora_request = LoRARequest(
                lora_name=version, lora_int_id=self._adapter_ids[version], lora_path=str(folder)
            )
        else:
            runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            runner_model.load_weights(weights=((name, p.data) for name, p in model.named_parameters()))
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.served_version = version

    def generate(self, prompts: Sequence[list[dict]], params: Sequence[SamplingParams]) -> list[Generation]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        rows = encode_chats(self.tokenizer, prompts)
        sampling = [
            VLLMSamplingParams(
                max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p or 1.0,
                stop=list(dict.fromkeys(self.stop_strings + p.stop)), skip_special_tokens=True,
                structured_outputs=None if p.grammar is None else StructuredOutputsParams(grammar=p.grammar.lark),
            )
            for p in params
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": row} for row in rows], sampling_params=sampling,
            lora_request=self.lora_request, use_tqdm=False,
        )
        results = []
        for row, output in zip(rows, outputs):
            completion = output.outputs[0]
            results.append(Generation(
                text=completion.text,  # vLLM leaves the stop string out, as DSPy expects
                prompt_tokens=len(row),
                completion_tokens=len(completion.token_ids),
                finish_reason="length" if completion.finish_reason == "length" else "stop",
            ))
        return results
