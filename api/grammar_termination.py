"""Does a grammar have any finished sentence at all? `start: "a" start` compiles, but a generation under it could
only end by running out of tokens; the edge refuses such a grammar with a 400 (llguidance does not check this).

A textbook productivity fixpoint over the rules of a Lark grammar (llguidance's dialect; GBNF is converted to
Lark first): a rule is productive when one of its alternatives consists of terminals and productive rules only;
`?`, `*`, `[...]` and zero-count repeats are always productive. The reading is conservative: anything this module
does not understand (llguidance extensions such as `%json`, `%regex`, `&`, `~`, `<special>`, `@grammar`) counts as
productive, and a grammar it cannot read at all is left to llguidance, so a valid grammar is never refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r]+) | (?P<nl>\n) | (?P<comment>(//|\#)[^\n]*)
    | (?P<string>"(?:\\.|[^"\\])*"i?)
    | (?P<regex>/(?:\\.|[^/\\\n])+/[imslux]*)
    | (?P<directive>%[a-z_]+)
    | (?P<special><[^<>\s]+>)
    | (?P<ref>@[\w\-]+)
    | (?P<name>[A-Za-z_][\w\-]*)
    | (?P<number>\d+)
    | (?P<op>->|\.\.|[:|()\[\]?*+~&{},.=!])
    """,
    re.VERBOSE,
)
_OPAQUE_DIRECTIVES = ("%json", "%regex", "%llguidance")  # followed by a {...} JSON block


class _Unreadable(Exception):
    pass


@dataclass(slots=True)
class _Tok:
    kind: str
    text: str
    line_start: bool


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    position, line_start = 0, True
    while position < len(text):
        if text.startswith(_OPAQUE_DIRECTIVES, position):
            match = re.match(r"%[a-z_]+\s*", text[position:])
            assert match is not None
            brace = position + match.end()
            if brace < len(text) and text[brace] == "{":
                end = _json_block_end(text, brace)
                out.append(_Tok("atom", text[position:end], line_start))
                position, line_start = end, False
                continue
        match = _TOKEN.match(text, position)
        if match is None:
            raise _Unreadable(f"unexpected {text[position]!r}")
        kind = match.lastgroup or ""
        if kind == "nl":
            line_start = True
        elif kind not in ("ws", "comment"):
            out.append(_Tok(kind, match.group(), line_start))
            line_start = False
        position = match.end()
    return out


def _json_block_end(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise _Unreadable("unclosed JSON block")


def _rules(tokens: list[_Tok]) -> dict[str, list[_Tok]]:
    """Rule name -> body tokens. A definition starts a line: [?!]name[.priority][attrs]: ..."""
    rules: dict[str, list[_Tok]] = {}
    current: list[_Tok] | None = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.line_start and (tok.kind == "directive" or tok.text.startswith("%")):
            current = None  # %import / %ignore / %llguidance lines are not rule bodies
            i += 1
            while i < len(tokens) and not tokens[i].line_start:
                i += 1
            continue
        if tok.line_start:
            j = i + 1 if tok.text in ("?", "!") else i
            if j < len(tokens) and tokens[j].kind == "name":
                k = j + 1
                if k + 1 < len(tokens) and tokens[k].text == "." and tokens[k + 1].kind == "number":
                    k += 2
                if k < len(tokens) and tokens[k].text == "[":
                    while k < len(tokens) and tokens[k].text != "]":
                        k += 1
                    k += 1
                if k < len(tokens) and tokens[k].text == ":":
                    current = rules.setdefault(tokens[j].text, [])
                    if current:
                        current.append(_Tok("op", "|", False))  # a repeated definition adds alternatives
                    i = k + 1
                    continue
        if current is None:
            raise _Unreadable(f"text outside a rule: {tok.text!r}")
        current.append(tok)
        i += 1
    return rules


class _Evaluator:
    """Recursive descent over one rule body, answering "can this derive a finished string?"."""

    def __init__(self, body: list[_Tok], productive: set[str], defined: set[str]) -> None:
        self.body, self.i, self.productive, self.defined = body, 0, productive, defined

    def _peek(self) -> str | None:
        return self.body[self.i].text if self.i < len(self.body) else None

    def alternatives(self) -> bool:
        result = self.sequence()
        while self._peek() == "|":
            self.i += 1
            result = self.sequence() or result
        return result

    def sequence(self) -> bool:
        result = True
        while self._peek() not in (None, "|", ")", "]"):
            if self._peek() == "->":
                self.i += 2  # an alias names the tree node; it does not change the language
                continue
            result = self.item() and result
        return result

    def item(self) -> bool:
        result = self.atom()
        while True:
            op = self._peek()
            if op in ("?", "*"):
                self.i, result = self.i + 1, True
            elif op == "+":
                self.i += 1
            elif op == "~":  # expr ~ N or expr ~ N..M
                self.i += 1
                low = self.body[self.i].text
                self.i += 1
                if self._peek() == "..":
                    self.i += 2
                result = result or low == "0"
            elif op == "{":  # expr{M,N}, expr{N}, expr{,N}
                self.i += 1
                low = self.body[self.i].text if self.body[self.i].kind == "number" else "0"
                while self._peek() not in (None, "}"):
                    self.i += 1
                self.i += 1
                result = result or low == "0"
            elif op == "&":  # terminal intersection: not analysed
                self.i += 1
                self.atom()
                result = True
            else:
                return result

    def atom(self) -> bool:
        tok = self.body[self.i]
        self.i += 1
        if tok.text in ("(", "["):
            inner = self.alternatives()
            if self._peek() not in (")", "]"):
                raise _Unreadable("unbalanced group")
            self.i += 1
            return True if tok.text == "[" else inner
        if tok.text == "~":  # negated terminal: not analysed
            self.atom()
            return True
        if tok.kind == "name":
            return tok.text in self.productive or tok.text not in self.defined
        if tok.kind in ("string", "regex", "special", "ref", "atom", "number"):
            return True
        raise _Unreadable(f"unexpected {tok.text!r}")


def unproductive_rules(lark: str) -> list[str] | None:
    """The rules that can never finish, when `start` is one of them; None when the grammar can finish (or this
    module cannot tell)."""
    try:
        rules = _rules(_tokens(lark))
        if "start" not in rules:
            return None
        productive: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, body in rules.items():
                if name not in productive:
                    evaluator = _Evaluator(body, productive, set(rules))
                    finishes = evaluator.alternatives()
                    if evaluator.i != len(body):
                        raise _Unreadable(f"could not read rule {name}")
                    if finishes:
                        productive.add(name)
                        changed = True
    except (_Unreadable, IndexError):
        return None
    if "start" in productive:
        return None
    return sorted(set(rules) - productive)
