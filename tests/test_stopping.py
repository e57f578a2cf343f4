"""StopMatcher: streamed matching equals matching the whole text, however it is split."""

import random

import pytest

from pocketlm.generate.stops import StopMatcher


def reference(text, stops):
    """Brute force: the first character at which some stop string has just appeared."""
    stops = [stop for stop in stops if stop]
    for end in range(1, len(text) + 1):
        done = [stop for stop in stops if text[:end].endswith(stop)]
        if done:
            return text[: end - len(max(done, key=len))], True
    return text, False


def stream(pieces, stops):
    """Feed `pieces` one by one; returns (everything emitted, stopped)."""
    matcher = StopMatcher(stops)
    emitted = []
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        emitted.append(out)
        if stopped:
            assert matcher.flush() == ""
            return "".join(emitted), True
    emitted.append(matcher.flush())
    return "".join(emitted), False


def split_at(text, cuts):
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


CASES = [
    ("Hello\nUser: hi", ["\nUser:"]),
    ("Hello\nUser: hi", ["User:", "\n"]),
    ("Hello\nUs", ["\nUser:"]),  # ends on a would-be prefix: released by flush
    ("xxabababc yy", ["ababc"]),
    ("xabcd", ["ab", "abc"]),
    ("xabcd", ["abcd", "c"]),
    ("abcd", ["abcd", "bc"]),
    ("stop here", ["stop"]),
    ("aaaaab", ["aab", "aaaaaaaa"]),
    ("no match at all", ["zz", "qq"]),
    ("emoji 🙂 then END!", ["END", "🙂 t"]),
    ("tail ab", ["abc"]),
    ("one two three", []),
    ("", ["x"]),
]


@pytest.mark.parametrize(("text", "stops"), CASES)
def test_every_split_matches_the_whole_text(text, stops):
    expected = reference(text, stops)
    assert stream([text], stops) == expected
    assert stream(list(text), stops) == expected
    for cut in range(len(text) + 1):
        assert stream([text[:cut], text[cut:]], stops) == expected
    rng = random.Random(text)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = split_at(text, cuts)
        assert stream(pieces, stops) == expected


def test_random_texts_against_the_reference():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        pieces = split_at(text, cuts)
        assert stream(pieces, stops) == reference(text, stops), (text, stops, pieces)


def test_stop_across_token_boundaries():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("Hel") == ("Hel", False)
    assert matcher.feed("lo\nUs") == ("lo", False)  # "\nUs" could start the stop
    assert matcher.feed("er:") == ("", True)
    assert matcher.matched == "\nUser:" and matcher.stopped


def test_earliest_match_wins_among_several_stops():
    matcher = StopMatcher(["User:", "\n"])
    assert matcher.feed("Hello\nUser: hi") == ("Hello", True)
    assert matcher.matched == "\n"


def test_stop_at_the_very_beginning():
    matcher = StopMatcher(["###"])
    assert matcher.feed("##") == ("", False)
    assert matcher.feed("# rest") == ("", True)


def test_overlapping_prefixes_stop_at_the_shorter_one():
    matcher = StopMatcher(["abc", "ab"])
    assert matcher.feed("xa") == ("x", False)
    assert matcher.feed("b") == ("", True)
    assert matcher.matched == "ab"


def test_no_stops_passes_text_straight_through():
    matcher = StopMatcher([])
    for piece in ["Hel", "lo", "\n", ""]:
        assert matcher.feed(piece) == (piece, False)
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored():
    matcher = StopMatcher(["", "END"])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.feed("xEND") == ("x", True)


def test_held_text_is_released_when_the_prefix_fails():
    matcher = StopMatcher(["Hello"])
    assert matcher.feed("Hel") == ("", False)
    assert matcher.feed("p") == ("Help", False)
    assert matcher.feed("He") == ("", False)
    assert matcher.flush() == "He"
    assert matcher.flush() == ""


def test_after_a_stop_nothing_more_is_emitted():
    matcher = StopMatcher(["x"])
    assert matcher.feed("axb") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_held_back_text_stays_shorter_than_the_longest_stop():
    # Bounded state is what makes each feed cost new text + longest stop, not the history.
    stops = ["<|end|>", "\n\nUser"]
    matcher = StopMatcher(stops)
    fed = emitted = 0
    rng = random.Random(1)
    for _ in range(2000):
        piece = "".join(rng.choice("<|end\nUsr x") for _ in range(rng.randint(0, 5)))
        out, stopped = matcher.feed(piece)
        if stopped:
            break
        fed, emitted = fed + len(piece), emitted + len(out)
        assert fed - emitted < max(map(len, stops))
