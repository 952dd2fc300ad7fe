"""A program of your own through the README's Python API: two DSPy modules on one LM, no bundled task.

The program summarizes a customer-support ticket, then routes the summary to a team. Only the team is labelled, so
the w step learns both modules' outputs from the runs whose team was right (the summaries are the model's own).

    python -m bt_trl.install qwen2.5-coder-0.5b   # the recipe's model (README, "Embedded models")
    python scripts/own_program.py --config recipes/own_program_qwen05.yaml
    python scripts/own_program.py --output_dir out/own_program_135m --strategy w --use_peft \
        --lora_target_modules all-linear --train_size 6 --val_size 3 --test_size 0   # embedded:smollm2-135m

Every `BetterTogetherConfig` field is a flag (`--strategy`, `--trace_rounds`, ...), and TRL's `ModelConfig` gives the
model and LoRA flags. Trains, tests and writes the run's folder as `bt-trl train` does (`--resume_from_checkpoint True`
continues an interrupted run; the test score of the kept program is printed and written to `summary.json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dspy
from trl import ModelConfig, TrlParser, get_peft_config

from bt_trl import EMBEDDED_MODEL, BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.cli.train import train_and_test
from bt_trl.tasks import Task


class TicketRouter(dspy.Module):
    """Summarize a support ticket, then route the summary to the team that handles it."""

    def __init__(self):
        super().__init__()
        self.summarize = dspy.Predict("ticket -> summary")
        self.route = dspy.Predict("summary -> team: Literal['billing', 'technical', 'account']")

    def forward(self, ticket):
        return self.route(summary=self.summarize(ticket=ticket).summary)


def team_matches(example, prediction, trace=None):
    return example.team == prediction.team


TICKETS = {
    "billing": [
        "I was charged twice for my subscription this month.",
        "Please send me an invoice for last year's payments.",
        "My refund has not arrived yet, it has been two weeks.",
        "Why did my card get declined when I upgraded my plan?",
        "The price on my receipt is higher than the one on your website.",
        "Can I switch from monthly to yearly billing and get the discount?",
        "I cancelled my plan but you still took money from my account.",
        "Your invoice is missing our company's VAT number.",
        "I would like to pay by bank transfer instead of credit card.",
        "The promo code I entered was not applied to my order.",
        "My bank statement shows a charge from you that I do not recognise.",
        "How do I update the credit card used for my payments?",
    ],
    "technical": [
        "The app crashes every time I open the settings page.",
        "The dashboard does not load, the page says server error 500.",
        "The export button produces an empty CSV file.",
        "Sync between my phone and laptop stopped working.",
        "Notifications no longer arrive on my Android phone since the update.",
        "The search returns no results even for words I know are there.",
        "Uploading a file larger than 10 MB fails with a timeout.",
        "The API returns 429 errors although we are far below our rate limit.",
        "Images in my reports do not render in Safari.",
        "The desktop app freezes when I drag a folder into it.",
        "Dark mode makes the text in tables unreadable.",
        "The calendar integration shows every meeting one hour late.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "Please delete my account and all my data.",
        "How do I change the email address on my profile?",
        "I want to add two colleagues to our team workspace.",
        "My account was locked after too many login attempts.",
        "Can you transfer ownership of the workspace to my manager?",
        "I need to turn on two-factor authentication for my login.",
        "Please change the name on my profile, I recently got married.",
        "Someone seems to have logged into my account from another country.",
        "How do I remove a former employee from our organisation?",
        "I signed up twice by mistake, can you merge my two accounts?",
        "Where can I download a copy of all my personal data?",
    ],
}


@dataclass
class SplitArguments:
    train_size: int = field(default=12, metadata={"help": "Tickets to train on (demos and traces)."})
    val_size: int = field(default=12, metadata={"help": "Tickets to pick candidates and steps on."})
    test_size: int = field(default=12, metadata={"help": "Tickets to score the kept program on."})

    def split(self) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
        """The tickets with the teams taking turns (billing, technical, account, billing, ...), cut in three."""
        by_team = [[(ticket, team) for ticket in tickets] for team, tickets in TICKETS.items()]
        examples = [dspy.Example(ticket=ticket, team=team).with_inputs("ticket")
                    for turn in zip(*by_team) for ticket, team in turn]
        if self.train_size + self.val_size + self.test_size > len(examples):
            raise ValueError(f"train_size + val_size + test_size must be at most {len(examples)} (the tickets)")
        val_end = self.train_size + self.val_size
        return (examples[:self.train_size], examples[self.train_size:val_end],
                examples[val_end:val_end + self.test_size])


def main(split_args: SplitArguments, args: BetterTogetherConfig, model_args: ModelConfig) -> None:
    train, val, test = split_args.split()
    trainer = BetterTogetherTrainer(
        model=model_args.model_name_or_path or EMBEDDED_MODEL,
        args=args,
        program=TicketRouter(),
        metric=team_matches,
        trainset=train,
        valset=val,
        peft_config=get_peft_config(model_args),
    )
    # As `bt-trl train` does: `--resume_from_checkpoint`, the test score printed, summary.json written.
    train_and_test(trainer, Task("ticket_router", TicketRouter, team_matches, train, val, test))
    trainer.end()


if __name__ == "__main__":
    main(*TrlParser((SplitArguments, BetterTogetherConfig, ModelConfig)).parse_args_and_config())
