"""What the forkserver of :mod:`tests.distributed` imports once for every rank it forks: the heavy libraries,
and DeepSpeed with its CPU shared-memory op skipped as fisherdist skips it (tests that call DeepSpeed
directly, before any fisherdist wrapper, would otherwise JIT-build it)."""

import peft  # noqa: F401
import safetensors.torch  # noqa: F401
import torch
import torch.distributed.checkpoint
import torch.distributed.fsdp
import torch.distributed.tensor  # noqa: F401
import transformers
import transformers.models.llama.modeling_llama  # noqa: F401

from fisherdist.distributed.wrap_deepspeed import _import_deepspeed

_import_deepspeed(3)
