"""The p and w steps on every rank of an `accelerate launch` job.

Program calls are the expensive part of BetterTogether, so N ranks share them instead of repeating them:

* Valset scoring and trace collection (`ProgramRunner.run`): each rank runs a contiguous share of the examples
  and the results are gathered in example order, so every rank ends with the same scores and the same SFT rows.
* The p step runs a DSPy teleprompter, which decides its own calls (sequential bootstrapping, candidate evaluation),
  so it runs on the main rank only; every generation batch it makes is split across the ranks
  (`split_generation` on the main rank, `serve_generation` on the others), and the resulting program state is
  broadcast, so every rank ends the step with the identical program.

Every rank generates from fully materialized weights (`BetterTogetherTrainer.generation_mode` gathers ZeRO-3 and FSDP
parameters once per block), so ranks may make different numbers of `generate` calls without deadlocking. A failure
on the main rank during the p step is sent to the other ranks, which raise instead of waiting for work; a rank that
dies ends the job through the launcher (torchrun stops the others).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers import Trainer

from bt_trl.serving.engine import EngineStats, Generation, GenerationBackend, SamplingParams

T = TypeVar("T")
R = TypeVar("R")


class RankFailure(RuntimeError):
    """Another rank failed in a step this rank was taking part in."""


class Ranks:
    """This process's place in the job (`accelerate`'s `PartialState`) and the few collectives the steps need."""

    def __init__(self, state: PartialState):
        self.state = state  # the Trainer's accelerator state: a fresh PartialState() would ignore `use_cpu`

    @property
    def world_size(self) -> int:
        return self.state.num_processes

    @property
    def index(self) -> int:
        return self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def shares(self, items: Sequence[T]) -> list[Sequence[T]]:
        """`items` cut into `world_size` contiguous shares, the first ones one item longer when it does not divide."""
        size, extra = divmod(len(items), self.world_size)
        bounds = [0]
        for rank in range(self.world_size):
            bounds.append(bounds[-1] + size + (rank < extra))
        return [items[bounds[r] : bounds[r + 1]] for r in range(self.world_size)]

    def map_split(self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
        """`fn` applied by each rank to its share of `items`; the results of all ranks, in the order of `items`."""
        results = fn(self.shares(items)[self.index])
        return results if self.world_size == 1 else gather_object(results)

    def broadcast(self, obj: T | None) -> T:
        """The main rank's `obj`, on every rank."""
        if self.world_size == 1:
            return obj
        return broadcast_object_list([obj], from_process=0)[0]

    def per_rank(self, value: T) -> list[T]:
        """`value` of every rank, indexed by rank."""
        return [value] if self.world_size == 1 else gather_object([value])

    @contextmanager
    def main_generates_for_all(self, backend: GenerationBackend):
        """On the main rank: a backend that splits each batch across all ranks (the others run `serve_generation`).
        On exit the other ranks are released, told whether the main rank's block failed."""
        failure = None
        try:
            yield _SplitBackend(self, backend)
        except BaseException as exc:
            failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.broadcast(_Stop(failure))

    def serve_generation(self, backend: GenerationBackend) -> EngineStats:
        """On the other ranks: generate this rank's share of each batch the main rank splits, until it stops.
        Returns what was generated here."""
        served = EngineStats()
        while not isinstance(job := self.broadcast(None), _Stop):
            prompts, params = job
            share = _generate_share(self, backend, prompts, params)
            gather_object([share])
            if not isinstance(share, str):
                served.count(share)
        if job.failure is not None:
            raise RankFailure(f"the main rank failed during the prompt step: {job.failure}")
        return served


@dataclass
class _Stop:
    failure: str | None  # what the main rank raised, if it did


class _SplitBackend:
    """The main rank's view of all ranks' generators as one `GenerationBackend`."""

    def __init__(self, ranks: Ranks, local: GenerationBackend):
        self.ranks, self.local = ranks, local
        self.local_stats = EngineStats()  # what the main rank generated itself

    def generate(self, prompts: Sequence[list[dict]], params: Sequence[SamplingParams]) -> list[Generation]:
        self.ranks.broadcast((list(prompts), list(params)))
        local = _generate_share(self.ranks, self.local, prompts, params)
        per_rank = gather_object([local])
        failures = [r for r in per_rank if isinstance(r, str)]
        if failures:  # the batch's waiting program calls see it as their error; the ranks go on serving
            raise RuntimeError(f"generation failed on another rank: {failures[0]}")
        self.local_stats.count(local)
        return [generation for share in per_rank for generation in share]


def _generate_share(ranks: Ranks, backend: GenerationBackend, prompts, params) -> list[Generation] | str:
    """This rank's share of a split batch, or the error it raised (every rank must reach the gather either way)."""
    share, share_params = ranks.shares(prompts)[ranks.index], ranks.shares(params)[ranks.index]
    try:
        return backend.generate(share, share_params) if share else []
    except Exception as exc:
        return f"rank {ranks.index}: {type(exc).__name__}: {exc}"


def end_job(trainer: Trainer) -> None:
    """`Trainer.end()` (trackers finished, process group destroyed) in the order that lets a gloo job exit cleanly;
    `BetterTogetherTrainer.end()` is this, and a plain `SFTTrainer` running `BetterTogetherCallback` can call it.

    With torch 2.13 a DDP job on gloo aborted at exit in about one run in five (SIGABRT, "terminate called without an
    active exception") or hung in `destroy_process_group`'s wake: the DDP wrapper sits in a reference cycle, so it
    outlives `trainer.end()` and frees the process group later, holding the GIL, while one of gloo's worker threads
    waits for the GIL to release the tensors of the last `all_gather` (the Trainer's FLOs count). So: a barrier first
    (the workers finish their releases while this thread waits without the GIL), then the wrapper dropped and
    collected while the group still exists, then the group destroyed. Call it last: nothing distributed works after.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()  # the accelerator's hold on the prepared (DDP / DeepSpeed) model
    gc.collect()
    trainer.accelerator.end_training()  # all that Trainer.end() does
