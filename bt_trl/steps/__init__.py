"""The steps of a strategy: prompt optimization (p) and fine-tuning on the program's own traces (w)."""
