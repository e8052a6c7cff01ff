"""Immutable value classes without the dataclasses module.

What the supervisor reads before it listens (its configuration, the
netlink family's description, the netlink messages) used to be frozen
dataclasses.  Importing dataclasses (and inspect, which it imports) and
generating each class's methods cost a fifth of the supervisor's
imports, seconds under emulation (docs/benchmarks.md, Start-up).

A subclass lists its fields in ``__slots__`` and sets each one in an
explicit ``__init__``: a field can be set once, never
again, nor deleted.  Instances compare, hash and print by their fields'
values, like a frozen dataclass's; fields named in ``UNCOMPARED`` are
left out of the comparison and the hash.
"""

from __future__ import annotations

# typing.TYPE_CHECKING without importing typing (mypy treats any
# TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Self


class Frozen:
    __slots__ = ()
    UNCOMPARED: frozenset[str] = frozenset()

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The field names (``__slots__``)."""
        return tuple(cls.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        # Unset slots raise AttributeError: only __init__ gets past this.
        if hasattr(self, name):
            raise AttributeError("cannot assign to field %r of an "
                                 "immutable %s" % (name, type(self).__name__))
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError("cannot delete field %r of an immutable %s"
                             % (name, type(self).__name__))

    def _compared(self) -> Iterator[object]:
        for name in self.fields():
            if name not in self.UNCOMPARED:
                yield getattr(self, name)

    def __eq__(self, other: object) -> bool:
        if (not isinstance(other, Frozen)
                or other.__class__ is not self.__class__):
            return NotImplemented
        return tuple(self._compared()) == tuple(other._compared())

    def __hash__(self) -> int:
        return hash(tuple(self._compared()))

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self.fields()))

    def replace(self, **changes: object) -> Self:
        """A copy with ``changes`` (field name -> value) applied."""
        unknown = set(changes) - set(self.fields())
        if unknown:
            raise TypeError("%s has no field %s" % (
                type(self).__name__, ", ".join(sorted(unknown))))
        new = object.__new__(type(self))
        for name in self.fields():
            object.__setattr__(new, name, changes.get(name,
                                                      getattr(self, name)))
        return new
