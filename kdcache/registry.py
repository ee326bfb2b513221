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
of any registry, so ``import kdcache`` and ``kdcache --help`` stay fast.

A plug-in loads all or nothing: one that fails to load (raises, calls ``sys.exit``, or has
a registration refused, such as a name taken already) is reported by one
:class:`PluginWarning` naming the entry point and its distribution, and is skipped with every
entry it registered withdrawn; a broken package does not stop the commands that do not
need it. At run time an exception from a plug-in's code (a data set's loader) becomes a
:class:`PluginError` naming the plug-in's distribution, not a kdcache bug; where kdcache calls the plug-in's
objects later (a model's ``forward`` in training), :func:`plugin_failure` tells, from the traceback, whose code
raised.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from types import FrameType
from typing import Any, Generic, Iterator, TypeVar

from kdcache.errors import KdcacheError, UnknownNameError

ENTRY_POINT_GROUP = "kdcache.plugins"

# A name as it can be typed after --arch/--method/--dataset: letters, digits, '_', '-', '.', starting alnum.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

T = TypeVar("T")


class PluginError(KdcacheError):
    """A plug-in's code raised at run time (a data set's loader): the plug-in's failure, not kdcache's."""


class PluginWarning(RuntimeWarning):
    """A plug-in that failed to load and is skipped (the command line prints it as one line)."""


_MISSING = object()


@dataclass
class _Journal:
    """What one plug-in registers while it loads, to withdraw it all if the plug-in fails."""

    thread: int
    origin: str                                     # "<distribution> <version>"
    undo: list[tuple[Registry[Any], str, object, str | None]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # registrations refused (even if the plug-in caught them)
    paused: int = 0                                 # > 0 inside builtin_registrations()


_journal: _Journal | None = None


def _recording() -> _Journal | None:
    """The journal of the plug-in loading on this thread, unless built-in entries are being added."""
    j = _journal
    return j if j is not None and j.thread == threading.get_ident() and not j.paused else None


@contextlib.contextmanager
def builtin_registrations() -> Iterator[None]:
    """Entries added in this block are kdcache's own even when a plug-in's load triggers them (a registry
    filled at its first use): a failing plug-in's withdrawal leaves them in place."""
    j = _journal
    if j is not None:
        j.paused += 1
    try:
        yield
    finally:
        if j is not None:
            j.paused -= 1


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order; every lookup loads the plug-ins first."""

    def __init__(self, noun: str) -> None:
        self.noun = noun            # "architecture", "data set", "method": for messages
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}  # name -> "<distribution> <version>" for a plug-in's entries
        self._home = sys._getframe(1).f_globals  # the module that made it, whose body adds kdcache's own entries

    def add(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Register ``entry`` as ``name``; a name taken already is an error unless ``replace``."""
        journal = _recording() if not self._home_filling() else None
        try:
            if not isinstance(name, str) or not _NAME.match(name):
                raise KdcacheError(f"cannot register {self.noun} {name!r}: a name is letters, digits, '_', '-' "
                                   "or '.', starting with a letter or digit")
            if name in self._entries and not replace:
                raise KdcacheError(f"{self.noun} {name!r} is registered already; choose another name "
                                   "(or pass replace=True to override it on purpose)")
        except KdcacheError as exc:
            if journal is not None:
                journal.refused.append(str(exc))
            raise
        if journal is not None:
            journal.undo.append((self, name, self._entries.get(name, _MISSING), self._origins.get(name)))
            self._origins[name] = journal.origin
        self._entries[name] = entry
        return entry

    def _home_filling(self) -> bool:
        """Whether the body of the module that made this registry is running up the stack: it adds kdcache's own
        entries, also when a plug-in's load imports that module first (``from kdcache.data import ...``)."""
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_globals is self._home and frame.f_code.co_name == "<module>":
                return True
            frame = frame.f_back
        return False

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests and plug-in authors undoing a registration); absent names are ignored."""
        self._entries.pop(name, None)
        self._origins.pop(name, None)

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

    def origin(self, name: str) -> str | None:
        """The distribution (``"<name> <version>"``) of the plug-in that registered ``name``; None for kdcache's
        own entries and those registered by the caller's code."""
        return self._origins.get(name)

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[None]:
        """Run the code of entry ``name`` (its loader, builder) in this block: when a plug-in registered it, an
        exception from it other than a KdcacheError becomes one PluginError naming the entry and the plug-in's
        distribution, so it reads as that plug-in's failure and not as a bug of kdcache; kdcache's own entries
        and the caller's raise as they are."""
        origin = self._origins.get(name)
        try:
            yield
        except KdcacheError:
            raise
        except (Exception, SystemExit) as exc:
            if origin is None:
                raise
            raise PluginError(f"the {self.noun} {name!r} from plug-in distribution {origin} raised: "
                              f"{_cause(exc)}") from exc

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _cause(exc: BaseException) -> str:
    """``exc`` as the end of one line: a KdcacheError's own text, else its type and its first line."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    lines = str(exc).strip().splitlines()
    if isinstance(exc, KdcacheError) and lines:
        return lines[0]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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


# The top-level module of each plug-in loaded, and its distribution ("<name> <version>").
_plugin_modules: dict[str, str] = {}


def plugin_failure(exc: BaseException) -> str | None:
    """When ``exc`` was raised by a loaded plug-in's code, one line naming its distribution, where and what; None
    when kdcache's own code raised it. The traceback is walked from where it was raised outwards: frames of
    third-party libraries (torch, numpy) are passed over, and the first frame of a plug-in's module or of kdcache
    decides."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    for tb in reversed(frames):
        top = str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0]
        if top == "kdcache":
            return None
        if top in _plugin_modules:
            code = tb.tb_frame.f_code
            return (f"plug-in distribution {_plugin_modules[top]} raised in {code.co_name} "
                    f"({code.co_filename}, line {tb.tb_lineno}): {_cause(exc)}")
    return None


def _distribution(ep: metadata.EntryPoint) -> str:
    """``"<name> <version>"`` of the distribution that declares ``ep``."""
    dist = ep.dist
    name = getattr(dist, "name", None) or "an unknown distribution"
    version = getattr(dist, "version", None)
    return f"{name} {version}" if version else name


def _load(ep: metadata.EntryPoint) -> None:
    """Load one plug-in all or nothing: on any failure but Ctrl-C (an exception, ``sys.exit``, a refused
    registration), withdraw what it registered and warn once, naming it and its distribution."""
    global _journal
    journal = _Journal(threading.get_ident(), _distribution(ep))
    _journal = journal
    try:
        obj = ep.load()
        if callable(obj) and not isinstance(obj, type):
            obj()
        failure = journal.refused[0] if journal.refused else None
    except KeyboardInterrupt:
        _withdraw(journal)
        raise
    except BaseException as exc:  # noqa: BLE001 - a plug-in's bug or exit must not stop or end kdcache
        failure = _cause(exc)
    finally:
        _journal = None
    if failure is None:
        _plugin_modules[ep.module.partition(".")[0]] = journal.origin
        return
    withdrawn = _withdraw(journal)
    kept = f" (withdrawn: {', '.join(withdrawn)})" if withdrawn else ""
    warnings.warn(f"kdcache plug-in {ep.name!r} ({ep.value}) from distribution {journal.origin} failed to load: "
                  f"{failure}; it is skipped, none of its registrations kept{kept}", PluginWarning, stacklevel=2)


def _withdraw(journal: _Journal) -> list[str]:
    """Undo the registrations in ``journal``, last first; what was withdrawn, in registration order."""
    withdrawn = []
    for registry, name, previous, origin in reversed(journal.undo):
        if previous is _MISSING:
            registry._entries.pop(name, None)
        else:
            registry._entries[name] = previous
        if origin is None:
            registry._origins.pop(name, None)
        else:
            registry._origins[name] = origin
        withdrawn.append(f"{registry.noun} {name!r}")
    return withdrawn[::-1]


def reset_plugins() -> None:
    """Let the next lookup load the entry points again (for tests that install a plug-in)."""
    global _loaded
    _loaded = False
