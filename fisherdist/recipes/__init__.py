"""The layer every method is built on: trainer, stage runner, config bases, losses."""
