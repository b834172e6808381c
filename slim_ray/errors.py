"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class SlimRayError(Exception):
    """An error caused by the user's input (config, files, options), not by a bug."""


class ConfigError(SlimRayError):
    pass


class DataError(SlimRayError):
    pass
