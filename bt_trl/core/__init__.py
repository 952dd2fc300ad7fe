"""The BetterTogether loop's shared pieces, used alike by the trainer, the callback and the DSPy provider: running
programs over examples, the model readied for generation, ranks, input checks, step results, interruptions."""
