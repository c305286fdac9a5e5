"""The builder's error type, in a module of its own so every builder module can raise it."""


class BuildError(RuntimeError):
    """The build cannot finish as asked (nothing to build, downloads incomplete, the output directory
    in use); the message is one line that says what to do."""
