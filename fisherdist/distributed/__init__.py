"""Distributed plumbing: process groups from any launcher (:mod:`.env`), local self-spawning
(:mod:`.spawn`), Slurm host lists (:mod:`.hostlist`) and model wrapping per backend (:mod:`.wrap`)."""

from fisherdist.distributed.env import DistEnv, init_distributed, teardown

__all__ = ["DistEnv", "init_distributed", "teardown"]
