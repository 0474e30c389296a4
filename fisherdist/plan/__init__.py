"""Memory planning: per-rank bytes of a run, from the model config (meta device) and the engine's placements.

``fisherdist plan`` (:mod:`fisherdist.plan.cli`); the arithmetic is checked against running processes in
``tests/test_plan*.py``.
"""
