"""The plugin API's version, and what becomes of a plugin written for another one.

The plugin API is what a plugin (a storage backend, eviction policy, serde or
transport registered under an ``lmcache.*`` entry point) implements or is
handed: the ABCs in ``backends.base`` (with ``BackendContext``),
``backends.frame_store``, ``eviction.base``, ``serdes.base`` and ``transport``,
and the suites in ``lmcache_core.testing``. It has one version number,
:data:`PLUGIN_API_VERSION`, raised whenever a change would break a plugin
written for the version before; lmcache-core's ``CHANGELOG.md`` says what
changed. Additions that break nothing (a new optional hook, a new context
field) do not raise it.

A plugin class says which version it is written for with a class attribute,
``api_version = 2``. The ABCs carry the current version as a default, marked
as inherited: a plugin that does not set it is checked by inspection instead
(see :class:`~lmcache_core.backends.frame_store.FrameStore`).

Policy (docs/architecture.md, "Plugins"):

* deprecate before breaking: the version before the current one keeps working
  through a compatibility path that warns (``DeprecationWarning`` and the log)
  and says what to change, for at least one minor release after the change;
* a plugin that declares a version this lmcache-core does not serve (newer than
  :data:`PLUGIN_API_VERSION`, or older than :data:`OLDEST_PLUGIN_API_VERSION`)
  is refused when it is loaded, with its name and what to do, never at run time.

Versions:

1. (2026-11-28) ``FrameStore._read(names)``: values read whole.
2. (2026-12-01) ``FrameStore._read(names, limit)``: a value larger than
   ``limit`` is not read (``Oversized``). Since 2026-12-06 plugins declare
   ``api_version`` and the ``extra_config`` keys they read
   (``extra_config_keys``).
"""

from __future__ import annotations

from lmcache_core.errors import PluginAPIError

#: The plugin API this lmcache-core implements.
PLUGIN_API_VERSION = 2
#: The oldest plugin API whose plugins still load (through a compatibility path).
OLDEST_PLUGIN_API_VERSION = 1


class InheritedAPIVersion(int):
    """The ABCs' default ``api_version``: an int that says "not declared by the plugin"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"InheritedAPIVersion({int(self)})"


#: What the ABCs set ``api_version`` to.
INHERITED_API_VERSION = InheritedAPIVersion(PLUGIN_API_VERSION)


def declared_api_version(cls: type) -> int | None:
    """The ``api_version`` a plugin class (or a class of the plugin's above it) sets; None if
    it only inherits the ABC's default."""
    version = getattr(cls, "api_version", None)
    if version is None or isinstance(version, InheritedAPIVersion):
        return None
    return version  # type: ignore[no-any-return]


def describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_api_version(obj: object, what: str) -> None:
    """Refuse ``obj`` (a plugin class) if it declares a plugin API this lmcache-core cannot serve.

    ``what`` names the plugin in the message (its entry point, or its class).
    """
    if not isinstance(obj, type):
        return
    version = declared_api_version(obj)
    if version is None:
        return
    from lmcache_core.version import __version__

    if not isinstance(version, int) or isinstance(version, bool):
        raise PluginAPIError(
            f"{what}: api_version={version!r} must be the number of the plugin API the plugin "
            f"is written for (this lmcache-core {__version__} serves {_served()})"
        )
    if version > PLUGIN_API_VERSION:
        raise PluginAPIError(
            f"{what} is written for plugin API {version}, newer than this lmcache-core "
            f"{__version__} serves ({_served()}): upgrade lmcache-core, or install a release "
            f"of the plugin written for plugin API {PLUGIN_API_VERSION}"
        )
    if version < OLDEST_PLUGIN_API_VERSION:
        raise PluginAPIError(
            f"{what} is written for plugin API {version}, which this lmcache-core "
            f"{__version__} no longer loads ({_served()}): update the plugin to plugin API "
            f"{PLUGIN_API_VERSION} (lmcache-core's CHANGELOG.md says what changed)"
        )


def _served() -> str:
    if OLDEST_PLUGIN_API_VERSION == PLUGIN_API_VERSION:
        return f"plugin API {PLUGIN_API_VERSION}"
    return f"plugin API {OLDEST_PLUGIN_API_VERSION} to {PLUGIN_API_VERSION}"
