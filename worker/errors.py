"""The one exception hierarchy of autoembed.

Every error a user can cause or meet derives from :class:`AutoembedError`; its message says
what went wrong and what to do. The CLI prints the message and exits with ``exit_code``.
"""

from __future__ import annotations


class AutoembedError(Exception):
    """autoembed failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(AutoembedError):
    """A setting is missing or invalid."""

    exit_code = 2


class ModelError(AutoembedError):
    """The model could not be resolved or loaded."""

    exit_code = 3


class ModelNotAvailable(ModelError):
    """The model's files are not on this machine and could not be downloaded."""


class ChecksumMismatch(ModelError):
    """A downloaded file does not have the pinned sha256."""


class EmbeddingError(AutoembedError):
    """The embedder could not embed a text."""


class DatabaseError(AutoembedError):
    """The database refused or could not be reached."""

    exit_code = 4


class MigrationError(DatabaseError):
    """A migration could not be applied."""


class WatchError(DatabaseError):
    """A watch could not be created, changed or removed."""


class LLMError(AutoembedError):
    """The LLM server failed or refused."""

    exit_code = 5


class LLMModelMissing(LLMError):
    """The LLM server does not have the requested model."""


class LLMTimeout(LLMError):
    """The LLM server did not answer within the timeout."""


class PromptError(ConfigError):
    """The summary prompt template is malformed or names no column of the row."""


class LLMUnavailable(LLMError):
    """The LLM server could not be reached (refused, reset, unknown host) or said it is loading."""


class LLMRefused(LLMError):
    """The LLM server refused the request (HTTP 4xx other than a missing model)."""
