"""Fisher accumulation inside training loops fisherdist does not own (``transformers.Trainer``, accelerate)."""
