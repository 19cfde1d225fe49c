"""Stop strings and partial UTF-8 in generated text."""

from __future__ import annotations

from actors.engine._textstream import StopMatcher, TextStream


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_a_stop_string_split_across_tokens_is_cut_and_never_emitted() -> None:
    assert feed_all(StopMatcher(["END"]), ["abc E", "N", "D tail"]) == ("abc ", True)


def test_a_false_start_of_a_stop_string_is_released() -> None:
    assert feed_all(StopMatcher(["END"]), ["abc E", "x"]) == ("abc Ex", False)


def test_withheld_text_is_flushed_when_generation_ends() -> None:
    assert feed_all(StopMatcher(["END"]), ["abc EN"]) == ("abc EN", False)


def test_the_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopMatcher(["b", "a"]), ["xxab"]) == ("xx", True)


def test_multibyte_characters_split_across_tokens_are_joined() -> None:
    stream = TextStream([])
    data = "é✓".encode()
    texts = [stream.feed(data[i : i + 1])[0] for i in range(len(data))]
    assert "".join(texts) + stream.flush() == "é✓"
