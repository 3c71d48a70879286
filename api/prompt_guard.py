"""Corrupt prompts: prompts asking for sexual content involving minors. Pure matching, no I/O.

As AI Horde does it (its "NSFW filter is back!" post and ``horde/detection.py``), patterns come in
groups: one names minors, one names sexual content. A prompt is *corrupt* when it matches a pattern
of EVERY group, so "a child flying a kite" and "a nude statue" pass and only the combination is
refused. Matching runs on a normalized prompt: lower case, accents and invisible characters gone,
``(word:1.3)`` weights and punctuation turned into spaces, and, for images, without the negative
prompt (after ``###``), where such words are what the requester wants to AVOID.

Operators point ``HORDE_CORRUPT_PROMPT_PATTERNS_FILE`` at a file of their own: one ``group: regex``
per line, ``#`` starts a comment. It replaces the defaults below.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Minors. Word-bounded, so "kidney" or "skid" do not count; ages are 1 to 17 as written out.
MINOR_PATTERNS = (
    r"\b(?:child|children|childs|kid|kids|kiddo|minor|minors|underage|under age|preteen|pre teen|tween|tweens)\b",
    r"\b(?:toddler|toddlers|infant|infants|newborn|prepubescent|pubescent|pedo|pedophile|paedo)\b",
    r"\b(?:loli|lolis|lolicon|lolita|shota|shotacon|jailbait)\b",
    r"\b(?:little|young|small|tiny) (?:girl|girls|boy|boys)\b",
    r"\b(?:elementary|primary|middle|grade) school(?:er|ers)?\b|\bschool ?(?:girl|girls|boy|boys|kid|kids)\b",
    r"\b(?:[1-9]|1[0-7]) ?(?:yo|y o|yrs? old|years? old|year old)\b|\baged? (?:[1-9]|1[0-7])\b",
    r"\b(?:daughter|son|niece|nephew) (?:aged|age) (?:[1-9]|1[0-7])\b",
)

#: Sexual content.
SEXUAL_PATTERNS = (
    r"\b(?:nude|nudes|nudity|naked|nsfw|sex|sexy|sexual|sexualized|porn|porno|pornographic|hentai|xxx)\b",
    r"\b(?:erotic|erotica|explicit|lewd|topless|bottomless|undressed|undressing|unclothed|lingerie|seductive)\b",
    r"\b(?:genital|genitals|nipple|nipples|penis|vagina|pussy|cum|orgasm|masturbat\w*|fellatio|blowjob)\b",
    r"\b(?:spread legs|bondage|fetish|intercourse|rape|molest\w*|grope|groping|ahegao)\b",
)

DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {"minor": MINOR_PATTERNS, "sexual": SEXUAL_PATTERNS}

_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?")  # "(cat:1.3)" -> "(cat"; the brackets go with the punctuation
_NOT_WORD = re.compile(r"[^\w]+|_+")
# Combining marks (accents once NFKD has split them off) and invisible format characters
# (soft hyphen, zero-width spaces and joiners, direction marks, word joiner, BOM).
_MARKS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
                    "\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


@dataclass(frozen=True)
class Match:
    """Which text of the prompt each group matched, for the moderators' log."""

    matched: dict[str, str]


@dataclass(frozen=True)
class PromptGuard:
    groups: dict[str, re.Pattern[str]]

    @classmethod
    def from_patterns(cls, groups: dict[str, Iterable[str]]) -> PromptGuard:
        compiled = {}
        for name, patterns in groups.items():
            patterns = list(patterns)
            if not patterns:
                continue
            compiled[name] = re.compile("|".join(f"(?:{p})" for p in patterns))
        if not compiled:
            raise ValueError("a prompt guard needs at least one pattern")
        return cls(compiled)

    @classmethod
    def default(cls) -> PromptGuard:
        return cls.from_patterns(DEFAULT_GROUPS)

    def corrupt(self, prompt: str, *, negative_after_hashes: bool = True) -> Match | None:
        """The match when ``prompt`` matches a pattern of every group; None when it is clean."""
        text = normalize(prompt.partition("###")[0] if negative_after_hashes else prompt)
        matched = {}
        for name, pattern in self.groups.items():
            found = pattern.search(text)
            if found is None:
                return None
            matched[name] = found.group(0)
        return Match(matched)


def normalize(prompt: str) -> str:
    """Lower case, no accents or invisible characters, no weights, words separated by one space."""
    text = prompt.lower()
    if not text.isascii():  # the common case skips this: it is the costly part on long prompts
        text = _MARKS.sub("", unicodedata.normalize("NFKD", text))
    return " ".join(_NOT_WORD.sub(" ", _WEIGHT.sub(" ", text)).split())


def parse_patterns(text: str) -> dict[str, list[str]]:
    """``group: regex`` lines (``#`` comments, blank lines ignored); ValueError names a bad line."""
    groups: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        group, sep, pattern = line.partition(":")
        group, pattern = group.strip(), pattern.strip()
        if not sep or not group or not pattern:
            raise ValueError(f"line {number}: expected 'group: regex', got {line!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"line {number}: bad regex {pattern!r}: {exc}") from None
        groups.setdefault(group, []).append(pattern)
    return groups


def load_guard(path: Path | None) -> PromptGuard:
    """The guard of the patterns file at ``path``; the default groups without one."""
    if path is None:
        return PromptGuard.default()
    return PromptGuard.from_patterns(parse_patterns(path.read_text(encoding="utf-8")))
