"""The reference semantics shared by tests/cpu, tests/gpu and bench (see moe_reference.py)."""
