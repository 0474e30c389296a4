"""fisherdist: sharded Fisher information for FSDP, DeepSpeed ZeRO and DDP, and the methods built on it."""

__version__ = "0.1.0"
