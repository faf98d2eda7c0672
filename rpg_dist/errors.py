"""Error types users see. Each message names the file, field and row (or config key) at fault."""


class RpgDistError(Exception):
    """Base class for every error rpg-dist raises on purpose."""


class ConfigError(RpgDistError, ValueError):
    """A config file, override or cross-field rule is invalid; the message names the field."""


class DataError(RpgDistError, ValueError):
    """Input data is malformed; the message names the file, the field and the row or user."""


class StorageError(RpgDistError, OSError):
    """A storage URI cannot be read or written (credentials, bucket, endpoint)."""


class StageError(RpgDistError, RuntimeError):
    """A stage cannot run because an artefact it needs is missing or incompatible."""


class ClusterError(RpgDistError, RuntimeError):
    """Ray could not be started or joined; the message names ``ray.address`` or the local start."""
