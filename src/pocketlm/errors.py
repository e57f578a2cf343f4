"""The one exception type users see.

Every user mistake (a bad name, a corrupt file, an out-of-range option) becomes a
`PocketLMError` whose message is one line saying what went wrong and what to do. The CLI
prints it without a traceback; the server turns it into a 4xx. Bugs stay ordinary
exceptions so that they keep their tracebacks.
"""


class PocketLMError(Exception):
    """A user-facing error: one line, actionable."""


class ModelNotFoundError(PocketLMError):
    """A model name or path that resolves to nothing on disk (or on the hub)."""


class CorruptModelError(PocketLMError):
    """A checkpoint, GGUF or config that cannot be read as what it claims to be."""
