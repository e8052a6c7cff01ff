"""tlshd.shared.frozen: immutable values compared by their fields."""

from __future__ import annotations

import pytest

from tlshd.shared.frozen import Frozen


class Pair(Frozen):
    __slots__ = ("left", "note", "right")
    UNCOMPARED = frozenset({"note"})

    def __init__(self, left: int, right: int, note: str = "") -> None:
        self.left = left
        self.right = right
        self.note = note


def test_fields_are_set_once():
    p = Pair(1, 2)
    with pytest.raises(AttributeError, match="immutable Pair"):
        p.left = 3
    with pytest.raises(AttributeError):
        del p.right
    with pytest.raises(AttributeError):
        p.other = 1  # no such slot
    assert (p.left, p.right) == (1, 2)


def test_equality_and_hash_leave_out_uncompared_fields():
    assert Pair(1, 2, "a") == Pair(1, 2, "b")
    assert hash(Pair(1, 2, "a")) == hash(Pair(1, 2, "b"))
    assert Pair(1, 2) != Pair(2, 1)
    assert Pair(1, 2) != (1, 2)


def test_repr_shows_every_field():
    assert repr(Pair(1, 2, "x")) == "Pair(left=1, note='x', right=2)"


def test_replace_copies_with_changes():
    p = Pair(1, 2, "a")
    q = p.replace(right=5)
    assert (q.left, q.right, q.note) == (1, 5, "a")
    assert (p.left, p.right) == (1, 2)
    with pytest.raises(AttributeError):
        q.right = 6
    with pytest.raises(TypeError, match="no field wrong"):
        p.replace(wrong=1)
