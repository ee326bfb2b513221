"""Named entries of one kind (architectures, data sets, methods), open to plug-ins.

Each kind keeps its own :class:`Registry` in its package (``kdcache.models``,
``kdcache.data``, ``kdcache.losses``); this module holds what they share: adding and
looking up names with one-line errors, and loading the plug-ins. A plug-in is an
installed distribution that declares an entry point in the group ``kdcache.plugins``::

    [project.entry-points."kdcache.plugins"]
    mine = "my_package.kdcache_plugin"

Loading the entry point imports that module (or, when it names a function, calls it
with no arguments); its ``kdcache.register_model`` / ``register_method`` /
``register_dataset`` calls add the entries. Plug-ins load once, at the first lookup
of any registry, so ``import kdcache`` and ``kdcache --help`` stay fast. A plug-in
that fails to load is reported by a warning naming it and is skipped: a broken
package does not stop the commands that do not need it.
"""

from __future__ import annotations

import re
import threading
import warnings
from importlib import metadata
from typing import Generic, Iterator, TypeVar

from kdcache.errors import KdcacheError, UnknownNameError

ENTRY_POINT_GROUP = "kdcache.plugins"

# A name as it can be typed after --arch/--method/--dataset: letters, digits, '_', '-', '.', starting alnum.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order; every lookup loads the plug-ins first."""

    def __init__(self, noun: str) -> None:
        self.noun = noun            # "architecture", "data set", "method": for messages
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Register ``entry`` as ``name``; a name taken already is an error unless ``replace``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise KdcacheError(f"cannot register {self.noun} {name!r}: a name is letters, digits, '_', '-' or "
                               "'.', starting with a letter or digit")
        if name in self._entries and not replace:
            raise KdcacheError(f"{self.noun} {name!r} is registered already; choose another name "
                               "(or pass replace=True to override it on purpose)")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests and plug-in authors undoing a registration); absent names are ignored."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry of ``name``; UnknownNameError listing the known names if absent."""
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.noun} {name!r}; known: {', '.join(self._entries)}") from None

    def names(self) -> list[str]:
        """Every registered name, built-in ones first, then the plug-ins' in loading order."""
        load_plugins()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_loaded = False
_loading = threading.RLock()


def load_plugins() -> None:
    """Load every ``kdcache.plugins`` entry point once (later calls return at once)."""
    global _loaded
    if _loaded:
        return
    with _loading:
        if _loaded:
            return
        _loaded = True  # set first: a plug-in's own lookups while it loads must not load again
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            _load(ep)


def _load(ep: metadata.EntryPoint) -> None:
    dist = getattr(ep.dist, "name", None) or "an installed package"
    try:
        obj = ep.load()
        if callable(obj) and not isinstance(obj, type):
            obj()
    except Exception as exc:  # a plug-in's bug must not stop kdcache: say which one, and go on
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"kdcache plug-in {ep.name!r} ({ep.value}, from {dist}) failed to load and is skipped: "
                      f"{text}", RuntimeWarning, stacklevel=2)


def reset_plugins() -> None:
    """Let the next lookup load the entry points again (for tests that install a plug-in)."""
    global _loaded
    _loaded = False
