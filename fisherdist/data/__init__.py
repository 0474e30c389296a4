"""Data loading: JSON Lines records (with errors that name the file and line) and tokenisation helpers."""
