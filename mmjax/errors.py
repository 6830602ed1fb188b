"""Expected failures, and the one place the command-line tools turn them into one line.

An *expected* failure is bad input or a bad setting: a missing or malformed file, a config value
that cannot work, a full or read-only disk. The tools print ``error: <one line>`` on stderr and
exit with status 2. Anything else is a bug in mmjax and keeps its traceback.

Each module raises its own subclass of :class:`UserError` (``ConfigError``, ``CheckpointError``,
``DataError``, ...), so a library caller can catch them precisely. They also subclass
``ValueError`` where they always have.
"""

from __future__ import annotations

import difflib
import errno
import re
import sys

EXIT_USAGE = 2   # a bad input or setting (absl's own exit status for a flag it cannot parse)


class UserError(Exception):
    """An expected failure with a message that says what is wrong and where (one line)."""


class DataError(UserError, ValueError):
    """A data file or data setting that cannot be read as the tools define it (file, line, reason)."""


# OS errors a user causes and can fix: a full disk or quota, no permission, a read-only file
# system, a path that does not exist
_OS_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory",
              errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory"}
_DISK_FULL = re.compile(r"No space left on device|ENOSPC|Disk quota exceeded", re.IGNORECASE)


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during (libraries wrap OS errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def expected_message(exc: BaseException) -> str | None:
    """The one-line message for an expected failure, None for a bug (which keeps its traceback).

    A disk-full error is found however deep a library (orbax, tensorstore) wrapped it."""
    for e in _chain(exc):
        if isinstance(e, UserError):
            return one_line(str(e))
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _OS_ERRNOS:
            name = e.filename if e.filename is not None else ""
            what = _OS_ERRNOS[e.errno]
            return one_line(f"{name}: {what}" if name else what)
    for e in _chain(exc):
        m = _DISK_FULL.search(str(e))
        if m:
            return one_line(f"disk full while writing ({m.group(0)}): {str(e)[:200]}")
    return None


def exit_on_expected(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an expected failure prints ``error: ...`` and exits 2."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:   # noqa: BLE001 - bugs are re-raised below
        msg = expected_message(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def close_keys(key: str, keys) -> list[str]:
    """Keys close to a mistyped ``key`` (the suggestions of an unknown-key error)."""
    return difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)


def _override_problem(argv: list[str], exc: BaseException) -> str:
    """An override flag that failed to apply, as one line naming the flag (and the close keys)."""
    text = one_line(str(exc).replace("\\n", " ").replace("\\'", "'"))
    m = re.search(r"'([^'\s]+)'", text)
    bad = m.group(1) if m else None
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("-")
        if name.startswith("config.") and bad and (name.split(".")[-1] == bad or f".{bad}." in f".{name}."):
            hint = re.search(r'Did you mean "([^"]+)"', text)
            if hint:
                return f"--{name}: the config has no key {bad!r}; did you mean {hint.group(1)!r}?"
            return f"--{name}: the config has no key {bad!r}"
    return text


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags_or_exit)``) with every flag
    error, a config override of an unknown key or a value of the wrong type included, as one line."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        msg = one_line(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:   # ml_collections' override errors
        msg = _override_problem(argv, e)
    except Exception as e:   # noqa: BLE001 - a config file that fails to load
        found = expected_message(e)
        if found is None:
            raise
        msg = found
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def config_or_exit(holder, flag: str = "config"):
    """The value of an ml_collections config-file flag; a config file that does not exist is one
    line (a config file that fails to run keeps its traceback: the error is in its code)."""
    try:
        value = holder.value
        value.get("name")   # a config that failed to load raises only when first read
        return value
    except OSError as e:
        text = " ".join(str(x) for x in _chain(e))
        m = re.search(r"No such file or directory: '([^']+)'", text)
        if m is None:
            raise
        print(f"error: --{flag}: config file not found: {m.group(1)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
