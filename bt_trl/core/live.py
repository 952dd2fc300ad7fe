"""The model being trained, served to DSPy: readied for generation in the middle of training, and programs bound to
an LM generating from it. The trainer, the callback and `load_program` all go through here."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import dspy
from accelerate.state import AcceleratorState
from accelerate.utils import extract_model_from_parallel
from trl.distributed import DistributedBackend
from trl.models.utils import add_hooks, remove_hooks

from bt_trl.core.runner import program_adapter, served_program
from bt_trl.serving.engine import GenerationBackend, engine_lm, eval_mode
from bt_trl.serving.settings import GenerationSettings


def distributed_backend() -> DistributedBackend:
    """TRL's view of the current job (ZeRO-3, FSDP). It reads only `accelerator.state`, a shared singleton."""
    return DistributedBackend(SimpleNamespace(state=AcceleratorState()))


@contextmanager
def gathered_parameters(model, modifier_rank: int | None = None):
    """Under ZeRO-3, the full parameters of `model` for the block (changes made on `modifier_rank` are kept); else
    nothing."""
    if distributed_backend().is_zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank):
            yield
    else:
        yield


@contextmanager
def model_for_generation(model, optimizer=None, gradient_checkpointing_kwargs: dict | None = None):
    """The unwrapped model that a `Trainer` trains (`model`: as the trainer or its callbacks hold it, wrapped or not),
    ready to generate: eval mode (no dropout), no gradient checkpointing (which silently disables the KV cache), every
    parameter materialized, so that ranks may make different numbers of `generate` calls. Under ZeRO-3 the parameters
    are gathered and DeepSpeed's forward hooks lifted for the block, as TRL's `unwrap_model_for_generation` does; the
    hooks are held by the engine's optimizer (`optimizer`, the trainer's, None before its first training). Under FSDP
    v1 (`model` is then the FSDP wrapper) the full parameters are summoned. Training state is restored on exit."""
    distributed = distributed_backend()
    unwrapped = extract_model_from_parallel(model)
    with ExitStack() as stack:
        if getattr(unwrapped, "is_gradient_checkpointing", False):
            unwrapped.gradient_checkpointing_disable()
            stack.callback(unwrapped.gradient_checkpointing_enable,
                           gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if distributed.is_zero3:
            stack.enter_context(gathered_parameters(unwrapped))
            if optimizer is not None:
                remove_hooks(optimizer)
                stack.callback(add_hooks, optimizer)
        stack.enter_context(distributed.summon_full_params(model, recurse=True, writeback=False))
        yield stack.enter_context(eval_mode(unwrapped))


def serve_program(program: dspy.Module, backend: GenerationBackend, name: str, settings: GenerationSettings,
                  adapter: dspy.Adapter | None = None) -> dspy.Module:
    """A copy of `program` served from `backend` under the LM name `name`, as the steps ran it (`served_program`:
    the steps' adapter, default `program_adapter()`, and generation settings). The copy owns its LM's engine, whose
    worker starts with the first call: `program.close()` (or leaving `with program:`) stops it."""
    return served_program(program, engine_lm(backend, name, settings), adapter or program_adapter())
