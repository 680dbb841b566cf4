"""Exceptions that reach users.

Every error lmcache raises on purpose says what to change: the config key, the
allowed values, the package to install. Callers can catch :class:`LMCacheError`
for all of them.
"""

from __future__ import annotations


class LMCacheError(Exception):
    """Base class of every error lmcache raises on purpose."""


class ConfigError(LMCacheError, ValueError):
    """The cache configuration is invalid.

    ``problems`` holds one message per problem, so a user fixes them all in
    one go instead of one per start.
    """

    def __init__(self, problems: list[str], source: str = "cache config") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{len(self.problems)} {noun} in {source}:\n{lines}")


class PluginNotFoundError(LMCacheError, LookupError):
    """No installed plugin has the requested name."""


class PluginAPIError(LMCacheError, TypeError):
    """A plugin is written for a plugin API this lmcache-core cannot serve.

    Raised when the plugin is loaded (or its class is made), never in the middle
    of a read: the message names the plugin, the versions, and what to change.
    """


class UnsupportedCapabilityError(LMCacheError, NotImplementedError):
    """A backend was asked for something its capabilities say it cannot do."""


class ChunkTooLargeError(LMCacheError, ValueError):
    """A chunk does not fit in one slot of the memory pool."""


class TokenError(LMCacheError, ValueError):
    """Token ids that cannot be keyed (negative, >= 2**32, or not integers)."""


class LayoutError(LMCacheError, ValueError):
    """A KV layout descriptor, or a buffer that does not match it, is invalid."""
