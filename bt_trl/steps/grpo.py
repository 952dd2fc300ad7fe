"""The `grpo` step: GRPO on the program's own metric, with the groups of mmGRPO (DSPy's `dspy.GRPO`, arXiv 2508.04660).

* Rollouts (`collect_rollouts`): `num_generations` traced runs of the program per example, sampled from the live
  model through the `ProgramRunner` (each rank runs a share), every rollout on its own copy of the served LM.
* Groups (`group_rollouts`): the calls of one module at one invocation index in the rollouts of one example, as
  mmGRPO groups them (variable call counts truncated to the fewest, its default). A rollout's reward is the metric's
  value, or `format_failure_score` when an output did not parse; each member's advantage is TRL's (group mean and
  standard deviation). Groups without reward variance carry no signal: they are skipped and counted.
* Training (`reinforce_on`): the given `SFTTrainer`'s own training loop on the groups' rows, with TRL's GRPO loss
  (`GRPOTrainer`'s default loss type, "dapo", β = 0) as its `compute_loss`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import datasets
import dspy
import torch
from trl import SFTTrainer
from trl.trainer.utils import nanstd, pad, selective_log_softmax

from bt_trl.core.live import model_for_generation
from bt_trl.core.ranks import Ranks
from bt_trl.core.runner import ProgramCall, ProgramRunner, program_adapter
from bt_trl.steps.sft import chat_row, rows_to_dataset, tokenized_rows, trace_to_rows, training_run

# GRPOConfig's default clipping range of the importance ratio (`epsilon`; `epsilon_high` defaults to it).
CLIP_EPSILON = 0.2


# ----------------------------------------------------------------------------------------------------------------
# Rollouts and groups
# ----------------------------------------------------------------------------------------------------------------


def collect_rollouts(runner: ProgramRunner, program: dspy.Module, examples: list[dspy.Example], lm: dspy.LM,
                     num_generations: int, temperature: float, first_rollout_id: int = 0) -> list[list[ProgramCall]]:
    """`num_generations` traced runs of `program` on each example, sampled at `temperature`: rollout k runs every
    example on its own copy of `lm` with rollout id `first_rollout_id + k`, so that DSPy's cache returns no earlier
    sample. An example's rollouts are called together, so that their identical prompts share a generation batch and
    its encoding (`TransformersBackend`). Returns, per example, its program calls in rollout order."""
    lms = [lm.copy(rollout_id=first_rollout_id + k, temperature=temperature) for k in range(num_generations)]
    calls = runner.run(program, [example for example in examples for _ in lms], lms * len(examples), with_trace=True)
    return [calls[i : i + num_generations] for i in range(0, len(calls), num_generations)]


def rollout_reward(call: ProgramCall, format_failure_score: float) -> float | None:
    """A rollout's reward: the metric's value as a number (`metric_number`: bool, number or
    `Prediction(score=...)`), or `format_failure_score` when an output did not parse; None when the program or the
    metric raised (no reward: such rollouts join no group)."""
    return format_failure_score if call.error == "parse" else call.metric_value


def group_advantages(rewards: list[float]) -> list[float] | None:
    """The advantages of a group's members as `GRPOTrainer` computes them (its default `scale_rewards="group"`):
    reward minus the group's mean, over the group's standard deviation plus 1e-4. None for a group without reward
    variance (or of one member), whose advantages would all be 0."""
    if len(rewards) < 2:
        return None
    values = torch.tensor(rewards, dtype=torch.float32)
    std = nanstd(values)
    if torch.isclose(std, torch.zeros_like(std)):
        return None
    return ((values - values.mean()) / (std + 1e-4)).tolist()


def call_rows(call: ProgramCall, adapter: dspy.Adapter) -> list[dict]:
    """One conversational prompt/completion row per module call of `call`'s trace, as the w step formats them
    (`trace_to_rows`); a call whose output did not parse completes its prompt with the text it wrote."""
    if call.unparsed_output is None:
        return trace_to_rows(call.trace, adapter)
    *parsed, (predictor, inputs, _) = call.trace
    prompt = adapter.format(signature=predictor.signature, demos=[], inputs=inputs)
    return [*trace_to_rows(parsed, adapter),
            chat_row([*prompt, {"role": "assistant", "content": call.unparsed_output}])]


@dataclass
class GroupStats:
    """What grouping one batch of rollouts found."""

    rollouts: int = 0
    format_failures: int = 0  # rollouts with an output that did not parse: rewarded format_failure_score
    unscored: int = 0  # rollouts whose program or metric raised: in no group
    groups: int = 0  # (example, module, invocation index) groups
    no_variance: int = 0  # groups skipped: every member got the same reward (or there is one member)
    truncated_calls: int = 0  # module calls past the fewest calls of their module among an example's rollouts

    @property
    def trained(self) -> int:
        return self.groups - self.no_variance


@dataclass
class GroupedRollouts:
    # One row per module call in a group: prompt, completion (conversational), example, rollout, module, invocation,
    # reward and advantage (None where the group had no reward variance).
    rows: list[dict] = field(default_factory=list)
    stats: GroupStats = field(default_factory=GroupStats)

    def training_rows(self) -> datasets.Dataset:
        """The rows of the groups with reward variance, as the conversational prompt/completion dataset
        `reinforce_on` trains on, with their `advantage`."""
        rows = [row for row in self.rows if row["advantage"] is not None]
        return rows_to_dataset(rows).add_column("advantage", [row["advantage"] for row in rows])


def group_rollouts(program: dspy.Module, rollouts: list[list[ProgramCall]], format_failure_score: float,
                   adapter: dspy.Adapter | None = None) -> GroupedRollouts:
    """The groups of mmGRPO (`dspy.GRPO`, `variably_invoked_predictor_grouping_mode="truncate"`): for each example
    (`rollouts[i]`: its rollouts, from `collect_rollouts`), each module of `program` and each invocation index up to
    the module's fewest calls in any scored rollout, the calls of that module at that index, one per rollout. All
    groups of an example share its rollouts' rewards (`rollout_reward`) and so their advantages
    (`group_advantages`).

    A member's prompt is the module's prompt without its demos, as DSPy's `GRPO` trains (it requires
    `exclude_demos=True`) and as the w step trains: the weights must do what the demos did."""
    adapter = adapter or program_adapter()
    modules = [name for name, _ in program.named_predictors()]
    grouped = GroupedRollouts()
    stats = grouped.stats
    for example_index, calls in enumerate(rollouts):
        stats.rollouts += len(calls)
        stats.format_failures += sum(call.error == "parse" for call in calls)
        scored = [(k, call, reward) for k, call in enumerate(calls)
                  if (reward := rollout_reward(call, format_failure_score)) is not None]
        stats.unscored += len(calls) - len(scored)
        advantages = group_advantages([reward for _, _, reward in scored]) or [None] * len(scored)
        # each scored rollout's rows, by module, in call order
        by_module = []
        for _, call, _ in scored:
            names = [name for name, _, _ in call.portable(program).trace]
            rows = call_rows(call, adapter)
            by_module.append({module: [row for name, row in zip(names, rows) if name == module] for module in modules})
        for module in modules:
            counts = [len(rows[module]) for rows in by_module]
            fewest = min(counts, default=0)
            stats.truncated_calls += sum(counts) - fewest * len(counts)
            for invocation in range(fewest):
                stats.groups += 1
                stats.no_variance += advantages[0] is None
                grouped.rows += [
                    {**rows[module][invocation], "example": example_index, "rollout": k, "module": module,
                     "invocation": invocation, "reward": reward, "advantage": advantage}
                    for (k, _, reward), rows, advantage in zip(scored, by_module, advantages)
                ]
    return grouped


# ----------------------------------------------------------------------------------------------------------------
# The loss and the training run
# ----------------------------------------------------------------------------------------------------------------


def completion_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                     completion_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token log-probabilities of the completions (prompts left-padded, completions right-padded) with the
    logits divided by the sampling `temperature`, as `GRPOTrainer._get_per_token_logps_and_entropies` computes
    them."""
    width = completion_ids.size(1)
    logits = model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                   attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                   logits_to_keep=width + 1).logits
    return selective_log_softmax(logits[:, :-1], completion_ids, temperature)  # position t predicts token t + 1


def grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, advantages: torch.Tensor,
              completion_mask: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """TRL's GRPO loss with `GRPOTrainer`'s defaults (loss type "dapo", β = 0, token-level importance sampling):
    the clipped policy-gradient term per completion token, summed over the batch's completion tokens and divided by
    `num_items`, the completion tokens of the whole batch one optimizer step trains on."""
    ratio = torch.exp(per_token_logps - old_per_token_logps)
    clipped = torch.clamp(ratio, 1 - CLIP_EPSILON, 1 + CLIP_EPSILON)
    advantages = advantages.unsqueeze(1)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)
    return (per_token_loss * completion_mask).sum() / torch.as_tensor(num_items).clamp(min=1.0)


def grpo_compute_loss(trainer: SFTTrainer, temperature: float, model, inputs: dict[str, torch.Tensor],
                      return_outputs: bool = False, num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
    """The `compute_loss` of a GRPO training run (`reinforce_on`): `grpo_loss` on a `rollout_batch`. The Trainer
    counts each optimizer step's completion tokens (all ranks' with `average_tokens_across_devices`, so the loss is
    multiplied by the number of ranks, whose gradients DDP averages, as `SFTTrainer.compute_loss` does); without a
    count the batch's own tokens normalize it. Without the rollout-time log-probs the ratio is 1, as in TRL."""
    if return_outputs:
        raise ValueError("a GRPO training run computes a loss only; it has no outputs to return")
    mask = inputs["completion_mask"]
    logps = completion_logps(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask,
                             temperature)
    old_logps = inputs.get("old_per_token_logps")
    old_logps = logps.detach() if old_logps is None else old_logps
    num_items = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = grpo_loss(logps, old_logps, inputs["advantages"], mask, num_items)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    return loss


def rollout_batch(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Tokenized rollout rows (`tokenized_rows`: `input_ids`, `labels` masking the prompt, `advantage`, and
    `old_per_token_logps` once computed) as a `GRPOTrainer` batch: prompts left-padded and completions right-padded,
    so that the completions end every sequence. `labels` (the completion tokens, -100 elsewhere) are there for the
    Trainer to count the completion tokens of each optimizer step."""
    starts = [next(i for i, label in enumerate(row["labels"]) if label != -100) for row in rows]
    prompts = [torch.tensor(row["input_ids"][:start]) for row, start in zip(rows, starts)]
    completions = [torch.tensor(row["input_ids"][start:]) for row, start in zip(rows, starts)]
    batch = {
        "prompt_ids": pad(prompts, pad_token_id, padding_side="left"),
        "prompt_mask": pad([torch.ones_like(p) for p in prompts], 0, padding_side="left"),
        "completion_ids": pad(completions, pad_token_id),
        "completion_mask": pad([torch.ones_like(c) for c in completions], 0),
        "advantages": torch.tensor([row["advantage"] for row in rows], dtype=torch.float32),
    }
    if "old_per_token_logps" in rows[0]:
        batch["old_per_token_logps"] = pad([torch.tensor(row["old_per_token_logps"]) for row in rows], 0.0)
    completion_labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    batch["labels"] = torch.cat([torch.full_like(batch["prompt_ids"], -100), completion_labels], dim=1)
    return batch


def rollout_logps(trainer: SFTTrainer, rows: datasets.Dataset, temperature: float) -> list[list[float]]:
    """Each row's completion log-probs under the current weights, the policy that sampled the rollouts: GRPO's "old"
    log-probs, against which the ratio is clipped once training has moved the weights (TRL computes them whenever one
    batch of rollouts trains more than one optimizer step). The ranks share the rows."""
    size = trainer.args.per_device_train_batch_size
    pad_token_id = trainer.processing_class.pad_token_id
    wrapped = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    with model_for_generation(wrapped, trainer.optimizer, trainer.args.gradient_checkpointing_kwargs) as model, \
            torch.no_grad():

        def share_logps(share: list[dict]) -> list[list[float]]:
            logps = []
            for start in range(0, len(share), size):
                batch = rollout_batch(share[start : start + size], pad_token_id)
                batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
                mask = batch["completion_mask"]
                batch_logps = completion_logps(model, batch["prompt_ids"], batch["prompt_mask"],
                                               batch["completion_ids"], mask, temperature)
                logps += [row[: int(row_mask.sum())].tolist() for row, row_mask in zip(batch_logps, mask)]
            return logps

        return Ranks(trainer.accelerator.state).map_split(share_logps, rows.to_list())


def reinforce_on(trainer: SFTTrainer, rollouts: datasets.Dataset, output_dir: str, temperature: float,
                 iterations: int = 1) -> list[float]:
    """One GRPO training run of `trainer` on `rollouts` (conversational prompt/completion rows with an `advantage`,
    from `GroupedRollouts.training_rows`), as `finetune_on` runs SFT: SFTTrainer's own loop with the trainer's batch
    size, gradient accumulation and learning rate, `iterations` passes over the rollouts (TRL's `num_iterations`, in
    place of `num_train_epochs`), a new optimizer and LR schedule, writing to `output_dir`. The loss is
    `grpo_compute_loss` at the sampling `temperature`. LoRA or full weights, one process or `accelerate launch` (the
    Trainer's sampler shares the rows among the ranks). Returns the logged training losses."""
    args = trainer.args
    if args.packing or not trainer.completion_only_loss:
        raise ValueError("a GRPO training run scores each rollout's completion on its own: it needs packing=False "
                         f"and completion_only_loss=True (got packing={args.packing}, "
                         f"completion_only_loss={trainer.completion_only_loss})")
    tokenized = tokenized_rows(trainer, rollouts).select_columns(["input_ids", "labels", "advantage"])
    trainer.train_dataset = tokenized.add_column("old_per_token_logps", rollout_logps(trainer, tokenized, temperature))
    collator, remove_unused_columns, epochs = trainer.data_collator, args.remove_unused_columns, args.num_train_epochs
    trainer.data_collator = functools.partial(rollout_batch, pad_token_id=trainer.processing_class.pad_token_id)
    trainer.compute_loss = functools.partial(grpo_compute_loss, trainer, temperature)
    args.remove_unused_columns = False  # the batches hold GRPOTrainer's columns, not the model's arguments
    args.num_train_epochs = iterations
    try:
        return training_run(trainer, output_dir)
    finally:
        trainer.data_collator, args.remove_unused_columns = collator, remove_unused_columns
        args.num_train_epochs = epochs
        del trainer.compute_loss
