import pytest

from ppruntime.engine.stop import StopStringMatcher, truncate_at_stop


def feed_all(matcher, deltas):
    emitted = []
    for delta in deltas:
        check = matcher.feed(delta)
        emitted.append(check.text)
        if check.matched is not None:
            return "".join(emitted), check.matched
    return "".join(emitted) + matcher.flush(), None


def test_stop_inside_one_delta():
    text, matched = feed_all(StopStringMatcher(["STOP"]), ["hello STOP world"])
    assert (text, matched) == ("hello ", "STOP")


@pytest.mark.parametrize(
    "deltas",
    [
        ["hel", "lo S", "TO", "P and more"],
        ["hello S", "T", "O", "P"],
        ["hello ", "STOP"],
        ["h", "e", "l", "l", "o", " ", "S", "T", "O", "P", "x"],
    ],
)
def test_stop_spanning_deltas(deltas):
    matcher = StopStringMatcher(["STOP", "\n\n"])
    text, matched = feed_all(matcher, deltas)
    assert (text, matched) == ("hello ", "STOP")
    assert matcher.finished and matcher.matched == "STOP"


def test_partial_stop_prefix_is_held_then_released():
    matcher = StopStringMatcher(["STOP"])
    first = matcher.feed("abc ST")
    assert first == type(first)("abc ", None)
    second = matcher.feed("ART")
    assert second.text == "START" and second.matched is None


def test_no_stop_flush_returns_everything():
    deltas = ["one S", "TO", "x", " two ST"]
    text, matched = feed_all(StopStringMatcher(["STOP"]), deltas)
    assert (text, matched) == ("".join(deltas), None)


def test_emitted_text_never_contains_stop_prefix_before_match():
    matcher = StopStringMatcher(["</end>"])
    emitted = [matcher.feed(d).text for d in ["a<", "/e", "n", "d>"]]
    assert emitted == ["a", "", "", ""]
    assert matcher.matched == "</end>"


def test_earliest_of_several_stop_strings():
    text, matched = feed_all(StopStringMatcher(["world", "lo"]), ["hello world"])
    assert (text, matched) == ("hel", "lo")


def test_feed_after_finish_emits_nothing():
    matcher = StopStringMatcher(["x"])
    matcher.feed("axb")
    assert matcher.feed("more").text == ""


def test_single_string_and_empty_rejected():
    assert StopStringMatcher("ab").feed("zab").text == "z"
    with pytest.raises(ValueError):
        StopStringMatcher([])
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_truncate_at_stop():
    assert truncate_at_stop("abc STOP def", ["STOP"]) == ("abc ", "STOP")
    assert truncate_at_stop("abc", ["STOP"]) == ("abc", None)
    assert truncate_at_stop("a\n\nb STOP", ["STOP", "\n\n"]) == ("a", "\n\n")
    assert truncate_at_stop("abcd", ["bc", "bcd"]) == ("a", "bcd")
