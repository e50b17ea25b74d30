"""User-facing errors: one line that names the file and the key. The CLI prints them without a traceback."""


class FoJaxError(Exception):
    """Base class of errors caused by user input (bad files, configs, arguments)."""


class ConfigError(FoJaxError, ValueError):
    """A config that does not describe a supported model."""


class LoadError(FoJaxError):
    """A checkpoint, config or tokenizer directory that cannot be loaded."""


class AudioError(FoJaxError, ValueError):
    """Audio input that cannot be used: unreadable, empty, non-audio, or at an unusable sample rate."""
