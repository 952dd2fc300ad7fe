"""`bt-trl`: the command line, in the style of TRL's `trl sft`.

    bt-trl train --config recipes/iris_quick.yaml [--flag value ...]
    bt-trl reproduce --config recipes/iris_quick.yaml --output_dir out/reproduce_iris [--strategies ...] [--seeds ...]
    bt-trl evaluate out/iris_quick --task iris --split test

Every subcommand reads a YAML recipe (`--config`) and flags with TRL's `TrlParser`; flags override the recipe. Under
`accelerate launch`, run the module: `accelerate launch --config_file X.yaml -m bt_trl.cli train --config ...`.
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser

from bt_trl.core.interrupts import interruptible

COMMANDS = {
    "train": "run a BetterTogether strategy on a task, then score the best program on its test set",
    "reproduce": "run strategies x seeds on one task and write RESULTS.md / RESULTS.png",
    "evaluate": "score a trained program (a run folder or a Hub id) on a task split",
}
# What to do after Ctrl-C, per command (steps and runs are saved as each one completes).
AFTER_INTERRUPT = {
    "train": "the completed steps are saved in --output_dir; the same command with --resume_from_checkpoint True "
             "continues after the last one",
    "reproduce": "the same command again skips the finished runs and resumes the interrupted one after its last "
                 "completed step",
    "evaluate": "nothing was written",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(prog="bt-trl", description="BetterTogether on TRL: prompt + weight optimization of DSPy "
                                                       "programs.")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for name, help_text in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)  # each command parses its own flags
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # exits, naming the valid commands
    name, rest = argv[0], argv[1:]
    if name == "train":
        from bt_trl.cli.train import run
    elif name == "reproduce":
        from bt_trl.cli.reproduce import run
    else:
        from bt_trl.cli.evaluate import run
    with interruptible():
        try:
            return run(rest, prog=f"bt-trl {name}")
        except KeyboardInterrupt:
            print(f"\nbt-trl {name}: interrupted (Ctrl-C); {AFTER_INTERRUPT[name]}", file=sys.stderr, flush=True)
            return 130  # the shell's code for a job ended by SIGINT
