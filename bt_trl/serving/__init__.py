"""Serving: generating a program's LM calls from a local model (batching engine, structured generation, vLLM) and the
embedded models."""
