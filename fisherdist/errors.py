"""User-facing errors: the CLI prints them as one line and exits with status 2 (no traceback)."""


class FisherdistError(Exception):
    """A problem with the user's input (config, paths, data, checkpoint) rather than a bug."""


class ConfigError(FisherdistError):
    """A malformed or invalid configuration value; the message names the file, key and expectation."""


class CheckpointError(FisherdistError):
    """A checkpoint that is missing, corrupted, or does not match the model / world size."""
