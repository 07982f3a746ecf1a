"""Experiments: FlexLoRA against its peers on a synthetic linear benchmark, a real LM, and load at scale."""
