"""Every private attribute of TRL, transformers and DSPy that bt_trl touches, with why. Public hooks are used
everywhere else; `tests/test_private_api.py` fails loudly when one of these disappears or changes its signature.

Tested with the versions in `TESTED_WITH`.
"""

from __future__ import annotations

TESTED_WITH = {"trl": "1.16.0", "transformers": "5.25.0", "dspy": "3.4.1"}

# "module:qualified name" -> (the parameters bt_trl passes or overrides, in order, None for a class attribute; why)
PRIVATE_API: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "trl:SFTTrainer._tag_names": (None, "set as TRL's trainers set it: the tags of the model card and pushes"),
    "trl:SFTTrainer._name": (None, "set as TRL's trainers set it: the trainer's name in the model card"),
    "trl:SFTTrainer._prepare_dataset": (
        ("self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
        "each training run (w and grpo steps) tokenizes its new rows as SFTTrainer.__init__ tokenizes its dataset "
        "(steps.sft.tokenized_rows)",
    ),
    "transformers:Trainer._push_from_checkpoint": (
        ("self", "checkpoint_folder"),
        "overridden to push nothing: during a w step output_dir is the step's folder, which would replace the run's "
        "result on the Hub",
    ),
    "transformers:Trainer.save_model": (
        ("self", "output_dir", "_internal_call"),
        "overridden and called with _internal_call=True: a run saves after every step, and pushes once at its end",
    ),
    "dspy.teleprompt:BootstrapFewShot._bootstrap": (
        ("self", "max_bootstraps"),
        "overridden by BatchedBootstrapFewShot: DSPy's loop with each attempt computed ahead, in batches",
    ),
    "dspy.teleprompt:BootstrapFewShot._bootstrap_one_example": (
        ("self", "example", "round_idx"),
        "called by BatchedBootstrapFewShot for each attempt: DSPy's own per-example bootstrapping",
    ),
}
