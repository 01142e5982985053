"""The one exception type the CLI turns into a single error line and a non-zero exit."""


class EdgekitError(Exception):
    """A user-facing error: bad input, a missing backend, a refused operation.

    The message is one line that says what is wrong and, where possible, what to do.
    """

    exit_code = 2


class MissingBackendError(EdgekitError):
    """An optional dependency is not installed; the message names the package to install."""

    def __init__(self, what: str, package: str):
        super().__init__(f"{what} needs the optional package '{package}': pip install {package}")
        self.package = package
