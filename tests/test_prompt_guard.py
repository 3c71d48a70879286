"""The corrupt-prompt matcher (api/prompt_guard.py): pure, no services."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.prompt_guard import PromptGuard, load_guard, normalize, parse_patterns

GUARD = PromptGuard.default()


@pytest.mark.parametrize("prompt", [
    "a nude child on a beach",
    "NSFW, (little girl:1.3), photo",
    "explicit picture of a 12-year-old",
    "naked   Lolí",  # accents and spacing do not hide it
    "s\u200bexy preteen",  # nor an invisible character inside a word... once removed it reads "sexy"
    "porn, schoolgirl, aged 14",
    "hentai_shota",  # underscores separate words
])
def test_minors_with_sexual_content_are_corrupt(prompt: str) -> None:
    match = GUARD.corrupt(prompt)
    assert match is not None, prompt
    assert set(match.matched) == {"minor", "sexual"}


@pytest.mark.parametrize("prompt", [
    "a child flying a kite in a meadow",
    "a nude marble statue, museum lighting",
    "portrait of a woman, 25 years old, sexy dress",
    "a kidney bean farm, skid marks, 18 years old, nude",  # no whole minor word; 18 is an adult
    "teenage mutant ninja turtles",
    "",
])
def test_either_alone_or_lookalike_words_are_clean(prompt: str) -> None:
    assert GUARD.corrupt(prompt) is None


def test_the_negative_prompt_is_not_screened_for_images_but_is_for_text() -> None:
    prompt = "a family picnic ### nude, child, nsfw"
    assert GUARD.corrupt(prompt) is None
    assert GUARD.corrupt(prompt, negative_after_hashes=False) is not None


def test_normalize_drops_weights_punctuation_accents_and_case() -> None:
    assert normalize("(Café:1.2), [NUDE]!!  très\tbien") == "cafe nude tres bien"
    assert normalize("a 12-year-old") == "a 12 year old"


def test_a_patterns_file_replaces_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "patterns.txt"
    path.write_text("# two groups, both must match\nfruit: \\bapple\\b\nfruit: \\bpear\\b\n\ncolour: \\bred\\b\n")
    guard = load_guard(path)
    assert guard.corrupt("a red pear") is not None
    assert guard.corrupt("a green apple") is None
    assert guard.corrupt("nude child") is None  # the defaults are gone
    assert load_guard(None).corrupt("nude child") is not None


def test_a_single_group_file_matches_on_one_pattern(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("banned: forbidden ?word\n")
    assert load_guard(path).corrupt("the FORBIDDEN-word") is not None


@pytest.mark.parametrize(("text", "error"), [
    ("no colon here", "line 1"),
    ("# fine\ngroup: (unclosed", "line 2: bad regex"),
    (": nameless", "line 1"),
])
def test_bad_pattern_lines_are_named(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_patterns(text)


def test_an_empty_pattern_set_is_refused() -> None:
    with pytest.raises(ValueError):
        PromptGuard.from_patterns({"empty": []})
