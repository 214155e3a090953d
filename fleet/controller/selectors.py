"""Label selectors as kubectl writes them: ``ring=canary,site!=plant-7,tier in (gold,silver),!legacy``.

Requirements are joined by commas and all must hold:

==========================  =========================================
``key=value``, ``key==value``  the label is set to value
``key!=value``              the label is not value (or not set)
``key in (a,b)``            the label is one of the values
``key notin (a,b)``         the label is none of them (or not set)
``key``                     the label is set
``!key``                    the label is not set
==========================  =========================================

Anything else is a ``BadRequest`` naming the part that is wrong. Keys and values follow the
operator-label rules' characters, so nothing here needs quoting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from fleet.controller.facade import BadRequest

MAX_LENGTH = 4096
MAX_REQUIREMENTS = 64
_KEY = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}"
_VALUE = r"[A-Za-z0-9._:/@+-]{1,128}"
_SET = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_COMPARE = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|!=|=)\s*(?P<value>{_VALUE})\s*$")
_EXISTS = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")
_VALUE_ONLY = re.compile(rf"^{_VALUE}$")


class Operator(StrEnum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    NOT_EXISTS = "!exists"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator in (Operator.EQUALS, Operator.IN):
            return value is not None and value in self.values
        if self.operator in (Operator.NOT_EQUALS, Operator.NOT_IN):
            return value is None or value not in self.values
        if self.operator is Operator.EXISTS:
            return value is not None
        return value is None


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    @classmethod
    def parse(cls, text: str | None, what: str = "selector") -> Selector | None:
        """The selector in ``text``; None for an empty one (everything matches)."""
        if text is None or not text.strip():
            return None
        if len(text) > MAX_LENGTH:
            raise BadRequest(f"{what}: longer than {MAX_LENGTH} characters")
        parts = _split(text, what)
        if len(parts) > MAX_REQUIREMENTS:
            raise BadRequest(f"{what}: more than {MAX_REQUIREMENTS} requirements")
        return cls(tuple(_requirement(part, text, what) for part in parts))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)

    def equality(self) -> dict[str, str] | None:
        """The selector as key=value pairs, or None if it uses anything but equality."""
        pairs: dict[str, str] = {}
        for requirement in self.requirements:
            if requirement.operator is not Operator.EQUALS:
                return None
            (value,) = requirement.values
            if pairs.setdefault(requirement.key, value) != value:
                return None
        return pairs


def _split(text: str, what: str) -> list[str]:
    """Split on the commas outside parentheses."""
    parts: list[str] = []
    depth, start = 0, 0
    for position, char in enumerate(text):
        if char == "(":
            depth += 1
            if depth > 1:
                raise BadRequest(f"{what} {text!r}: nested parentheses")
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise BadRequest(f"{what} {text!r}: ')' without '('")
        elif char == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    if depth:
        raise BadRequest(f"{what} {text!r}: '(' without ')'")
    parts.append(text[start:])
    return parts


def _requirement(part: str, text: str, what: str) -> Requirement:
    if (found := _SET.match(part)) is not None:
        values = [value.strip() for value in found.group("values").split(",")]
        bad = [value for value in values if not _VALUE_ONLY.match(value)]
        if bad:
            raise BadRequest(f"{what} {text!r}: {bad[0]!r} in {part.strip()!r} is not a label value")
        operator = Operator.IN if found.group("op") == "in" else Operator.NOT_IN
        return Requirement(found.group("key"), operator, frozenset(values))
    if (found := _COMPARE.match(part)) is not None:
        operator = Operator.NOT_EQUALS if found.group("op") == "!=" else Operator.EQUALS
        return Requirement(found.group("key"), operator, frozenset({found.group("value")}))
    if (found := _EXISTS.match(part)) is not None:
        operator = Operator.NOT_EXISTS if found.group("neg") else Operator.EXISTS
        return Requirement(found.group("key"), operator)
    raise BadRequest(
        f"{what} {text!r}: cannot read {part.strip()!r}"
        " (expected key=value, key!=value, key in (a,b), key notin (a,b), key or !key)"
    )
