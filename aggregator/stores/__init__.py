"""Implementations of the round store contract."""
