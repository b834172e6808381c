"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class SlimRayError(Exception):
    """An error caused by the user's input (config, files, options), not by a bug."""


class ConfigError(SlimRayError):
    pass


class DataError(SlimRayError):
    pass


class RequestError(Exception):
    """A bad request to the serving API: becomes a 4xx/503 JSON error; the service keeps serving."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason
