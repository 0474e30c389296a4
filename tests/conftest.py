"""Shared test fixtures. Multi-process tests go through :func:`tests.distributed.run_distributed`."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
