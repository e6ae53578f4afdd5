"""One exception family for graftkit.

Every error derives from :class:`GraftkitError` and also from the builtin users already catch
(``ValueError``, ``KeyError``, ``ImportError`` ...), so ``except ValueError`` keeps working.
Messages name the thing (file, key, module, expected vs got) and say what to do next.
"""

from __future__ import annotations


class GraftkitError(Exception):
    """Base class of every error graftkit raises on purpose."""


class ConfigError(GraftkitError, ValueError):
    """A config value, or an ``adapter_config.json`` file, is invalid."""


class UnknownFieldError(ConfigError, TypeError):
    """A config was built with a keyword that is not one of its fields (the message names the likely one)."""


class TargetError(GraftkitError, ValueError):
    """Target modules did not match, or matched a layer kind the method cannot adapt."""


class CheckpointError(GraftkitError, ValueError):
    """An adapter checkpoint cannot be read, or does not fit the model (keys, shapes, files)."""


class UsageError(GraftkitError, ValueError):
    """A call's arguments do not fit the model's state (a base already wrapped, routing that does not fit)."""


class SaveError(GraftkitError, OSError):
    """A checkpoint could not be written (permissions, disk full ...); the folder keeps its previous checkpoint."""


class AdapterNameError(GraftkitError, KeyError, ValueError):
    """An adapter name is unknown, or already taken (a ``KeyError``, and a ``ValueError`` as HF peft raises)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedError(GraftkitError, NotImplementedError):
    """A feature of the ecosystem's format or API that graftkit does not implement (yet)."""


class MissingPackageError(GraftkitError, ImportError):
    """An optional package is needed for this path; the message says the install command."""


class PeftWarning(UserWarning):
    """The warning category of HF peft's warnings, for code that filters on it (``warnings.filterwarnings(...,
    category=PeftWarning)``)."""
