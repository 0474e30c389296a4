"""Fisher-guided fine-tuning and unlearning methods, each a thin consumer of :mod:`fisherdist.fisher`."""
