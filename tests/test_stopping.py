"""StopStringMatcher: streamed stop strings, withheld text, unicode, and a brute-force oracle."""

import random

import pytest

from localllm.stopping import StopStringMatcher


def run(stops, pieces):
    """Push every piece; return (list of (emitted, stopped) per push, flushed text)."""
    matcher = StopStringMatcher(stops)
    results = [matcher.push(piece) for piece in pieces]
    return results, matcher.flush()


def test_accented_stop_across_pushes():
    results, flushed = run(["é!"], ["caf", "é", "!"])
    assert results == [("caf", False), ("", False), ("", True)]
    assert flushed == ""


def test_emoji_stop_across_pushes_and_nothing_after_it():
    results, flushed = run(["🎉END"], ["Hello 🎉", "EN", "D and more", "even more"])
    assert results == [("Hello ", False), ("", False), ("", True), ("", True)]
    assert flushed == ""


def test_withheld_text_is_released_when_it_stops_matching():
    results, flushed = run(["STOP"], ["go ST", "ART now", " ✓ é"])
    assert results == [("go ", False), ("START now", False), (" ✓ é", False)]
    assert flushed == ""


def test_text_before_stop_in_same_push_and_nothing_after():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("abc</s>xyz") == ("abc", True)
    assert matcher.stopped and matcher.matched == "</s>"
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_at_the_very_start():
    assert run(["<|end|>"], ["<|end|>"])[0] == [("", True)]
    assert run(["<|end|>"], ["<|", "end", "|>tail"])[0] == [("", False), ("", False), ("", True)]


def test_flush_returns_withheld_text():
    results, flushed = run(["END"], ["the E", "N"])
    assert results == [("the ", False), ("", False)]
    assert flushed == "EN"


def test_overlapping_candidates_shorter_completes_first():
    results, _ = run(["abc", "ab"], ["xa", "b", "c"])
    assert results == [("x", False), ("", True), ("", True)]


def test_first_completed_stop_wins_however_the_text_is_split():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True)
    assert matcher.matched == "lo w"
    # "bc" completes before "abcd" could: it wins in one push or character by character
    for pieces in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        matcher = StopStringMatcher(["abcd", "bc"])
        emitted = "".join(matcher.push(piece)[0] for piece in pieces)
        assert (emitted, matcher.matched) == ("a", "bc")
    # completing on the same character: the earliest start (longest) wins
    matcher = StopStringMatcher(["b", "ab"])
    assert matcher.push("xab") == ("x", True)
    assert matcher.matched == "ab"


def test_self_overlapping_prefix_is_withheld_exactly():
    results, flushed = run(["aab"], ["aaa", "a", "b"])
    assert results == [("a", False), ("a", False), ("", True)]
    results, flushed = run(["aab"], ["aaa", "c"])
    assert results == [("a", False), ("aac", False)]


def test_no_stops_and_empty_stops_pass_everything_through():
    assert run([], ["a", "b"]) == ([("a", False), ("b", False)], "")
    assert run(["", ""], ["a", ""]) == ([("a", False), ("", False)], "")


def test_single_string_is_one_stop_and_bad_types_are_errors():
    assert run("END", ["xEN", "D"])[0] == [("x", False), ("", True)]
    with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
        StopStringMatcher(["ok", 3])


def _longest_partial_tail(text, stops):
    return max([n for s in stops for n in range(1, len(s)) if len(text) >= n and text.endswith(s[:n])], default=0)


def _oracle(text, stops):
    """(length of text emitted overall, index of the char whose arrival stops it or None)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return min(starts), end - 1
    return len(text), None


@pytest.mark.parametrize("seed", range(200))
def test_matches_brute_force_oracle(seed):
    rng = random.Random(seed)
    alphabet = "abé🎉"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]

    emitted_length, stop_char = _oracle(text, stops)
    matcher = StopStringMatcher(stops)
    emitted, seen = "", 0
    for piece in pieces:
        out, stopped = matcher.push(piece)
        emitted += out
        seen += len(piece)
        arrived = stop_char is not None and stop_char < seen
        assert stopped == arrived, (stops, pieces)
        if not stopped:  # withholds exactly the longest tail that could still start a stop
            assert emitted == text[: seen - _longest_partial_tail(text[:seen], stops)], (stops, pieces)
        if stopped:
            break
    emitted += matcher.flush()
    assert emitted == text[:emitted_length], (stops, pieces)
    whole = StopStringMatcher(stops)
    out, stopped = whole.push(text)
    assert (out + whole.flush(), stopped) == (text[:emitted_length], stop_char is not None), stops
