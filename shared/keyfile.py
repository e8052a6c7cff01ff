"""A GLib key file (the format of tlshd's configuration file), read into
sections of key -> value and line.

``[section]`` headers, ``key=value`` lines, ``#`` comments; a repeated
header continues its section, as in GLib, and a key set twice is an
error.  Errors and warnings name the file and line.  The typed getters
check one value each; which sections and keys exist is the caller's
schema (tlshd.shared.config).
"""

from __future__ import annotations

from tlshd.shared.errors import ConfigError
from tlshd.shared.frozen import Frozen

# typing.TYPE_CHECKING without importing typing (mypy treats any
# TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


def show(text: str, limit: int = 60) -> str:
    """``text`` quoted for a one-line message, shortened if long."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def is_url(value: str) -> bool:
    """A URL scheme prefix, as ktls-utils tells key URLs from paths."""
    if not value[:1].isascii() or not value[:1].isalpha():
        return False
    for ch in value[1:]:
        if ch == ":":
            return True
        if not (ch.isascii() and (ch.isalnum() or ch in "+-.")):
            return False
    return False


def _fmt(number: float) -> str:
    return "%d" % number if number == int(number) else "%g" % number


def _hint(name: str, known: Iterable[str], fmt: str = "%s") -> str:
    # Imported only for a name that needs a suggestion: most files have
    # none, and the daemon reads its file before it listens.
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return " (did you mean %s?)" % (fmt % close[0]) if close else ""


class Value(Frozen):
    """One key's value and the line that sets it."""

    __slots__ = ("line", "text")
    text: str
    line: int

    def __init__(self, text: str, line: int) -> None:
        self.text = text
        self.line = line


class KeyFile:
    """A GLib key file, read into sections of key -> value and line."""

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.sections: dict[str, dict[str, Value]] = {}
        self.section_lines: dict[str, int] = {}
        self.warnings: list[str] = []
        current: str | None = None
        for number, raw in enumerate(text.split("\n"), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                name = line[1:-1]
                if (not line.endswith("]") or not name or "[" in name
                        or "]" in name or not name.isprintable()):
                    raise self.error(number, "malformed section header %s"
                                     % show(line))
                current = name
                # Repeated headers continue the section, as in GLib.
                self.sections.setdefault(name, {})
                self.section_lines.setdefault(name, number)
                continue
            key, eq, value = line.partition("=")
            key = key.strip()
            if not eq or not key:
                raise self.error(number, "%s is not a [section] header, a "
                                 "key=value line or a # comment"
                                 % show(line))
            if current is None:
                raise self.error(number, "%s= comes before any [section]"
                                 % key)
            old = self.sections[current].get(key)
            if old is not None:
                raise self.error(number, "[%s] %s is set twice (first on "
                                 "line %d)" % (current, key, old.line))
            self.sections[current][key] = Value(value.strip(), number)

    def error(self, line: int, message: str) -> ConfigError:
        return ConfigError("%s:%d: %s" % (self.path, line, message))

    def warn(self, line: int, message: str) -> None:
        self.warnings.append("%s:%d: %s" % (self.path, line, message))

    def value(self, section: str, key: str) -> Value | None:
        return self.sections.get(section, {}).get(key)

    def get(self, section: str, key: str) -> str:
        value = self.value(section, key)
        return "" if value is None else value.text

    def check_names(self, known: Mapping[str, frozenset[str]],
                    no_effects: Mapping[str, Mapping[str, str]]) -> None:
        """Warn once about each unknown section and key; ``known``: the
        keys read, by section; ``no_effects``: known keys that do nothing
        here, with the reason."""
        for section, keys in self.sections.items():
            if section not in known:
                self.warn(self.section_lines[section],
                          "unknown section [%s] ignored%s"
                          % (section, _hint(section, known, "[%s]")))
                continue
            no_effect = no_effects.get(section, {})
            for key, value in keys.items():
                if key in known[section]:
                    continue
                why = no_effect.get(key)
                if why is None:
                    self.warn(value.line, "unknown key %s in [%s] ignored%s"
                              % (key, section,
                                 _hint(key, [*known[section], *no_effect])))
                elif value.text not in ("", "0"):
                    self.warn(value.line, "[%s] %s has no effect in this "
                              "tlshd: %s" % (section, key, why))

    def number(self, section: str, key: str, default: float,
               low: float, high: float, integer: bool) -> float:
        value = self.value(section, key)
        if value is None or value.text == "":
            return default
        try:
            number = int(value.text, 10) if integer else float(value.text)
        except ValueError:
            raise self.error(value.line, "[%s] %s: %s is not a%s number"
                             % (section, key, show(value.text),
                                " whole" if integer else "")) from None
        if not low <= number <= high:
            raise self.error(value.line, "[%s] %s: %s is out of range "
                             "(%s to %s)" % (section, key, value.text,
                                             _fmt(low), _fmt(high)))
        return number

    def boolean(self, section: str, key: str, default: bool) -> bool:
        """A GLib key-file boolean: true/false (1/0 accepted, as GLib
        does)."""
        value = self.value(section, key)
        if value is None or value.text == "":
            return default
        if value.text in ("true", "1"):
            return True
        if value.text in ("false", "0"):
            return False
        raise self.error(value.line, "[%s] %s: %s is not true or false"
                         % (section, key, show(value.text)))

    def path_value(self, section: str, key: str) -> str | None:
        """A file name: absolute, or refused (relative to what? the
        service runs in /, a shell wherever it is)."""
        value = self.value(section, key)
        if value is None or value.text == "":
            return None
        if key == "x509.private_key" and is_url(value.text):
            # Only the scheme: a PKCS#11 URL may carry a PIN.
            self.warn(value.line, "[%s] %s: %s URLs (PKCS#11 tokens and "
                      "the like) are not supported by this tlshd; the "
                      "setting has no effect"
                      % (section, key, value.text.split(":", 1)[0] + ":"))
            return None
        if not value.text.startswith("/"):
            raise self.error(value.line, "[%s] %s: %s is not an absolute "
                             "path (relative paths are refused)"
                             % (section, key, show(value.text)))
        return value.text
