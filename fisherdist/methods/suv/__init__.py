"""SUV (arXiv 2503.22948): mine verbatim reproductions, build preference pairs, then DPO with a
differential-Fisher barrier and/or retain-gradient projection on LoRA."""
