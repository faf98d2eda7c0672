"""Fixtures for tests and benchmarks (synthetic codes, token tables, stand-in semantic IDs).

Nothing in the stages imports this package: it ships so that benchmarks and downstream tests can
build the same inputs ours use.
"""
