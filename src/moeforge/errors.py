"""Error types the CLI turns into one-line messages (anything else is a bug and keeps its traceback)."""


class MoeforgeError(Exception):
    """A problem with the user's input (config, data, checkpoint), not with moeforge itself."""


class ConfigError(MoeforgeError, ValueError):
    """An impossible or unknown configuration value."""


class DataError(MoeforgeError):
    """A missing, empty or unreadable data source."""


class CheckpointError(MoeforgeError):
    """A missing, corrupt or mismatched checkpoint."""


class TrainingError(MoeforgeError):
    """Training cannot go on (e.g. repeated non-finite losses)."""
