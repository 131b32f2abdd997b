"""Exceptions the toolkit raises for bad input. The CLI prints them without a traceback."""


class FairCalibError(Exception):
    """Base class: a problem with the user's input, files or request."""


class DataError(FairCalibError):
    """Unknown corpus or split, checksum mismatch, or text too short for the request."""


class CheckpointError(FairCalibError):
    """A model directory or weight file is missing, malformed, mismatched or non-finite."""


class ConfigError(FairCalibError):
    """An unsupported or inconsistent configuration (bit width, group size, ...)."""


class OutputError(FairCalibError):
    """An output location that cannot be written: read-only, full, not a directory, ..."""
