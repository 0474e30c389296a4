"""Evaluation: verbatim memorisation (SUV protocol), utility (perplexity, task accuracy) and reports."""
