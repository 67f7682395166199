from aicc.engine.detokenizer import IncrementalDetokenizer


def test_holds_back_incomplete_utf8() -> None:
    detok = IncrementalDetokenizer()
    euro = "€".encode()
    assert detok.push(b"a" + euro[:1]) == "a"
    assert detok.push(euro[1:2]) == ""
    assert detok.push(euro[2:]) == "€"
    assert detok.flush() == ""


def test_invalid_bytes_become_replacement_characters_at_flush() -> None:
    detok = IncrementalDetokenizer()
    assert detok.push(b"ok\xe2\x82") == "ok"
    assert detok.flush() == "\ufffd"


def test_stop_string_is_not_leaked_even_across_tokens() -> None:
    detok = IncrementalDetokenizer(stop=("STOP",))
    released = [detok.push(piece) for piece in (b"hello S", b"TO", b"P and more")]
    assert "".join(released) == "hello "
    assert detok.stopped
    assert detok.push(b"later") == ""
    assert detok.flush() == ""


def test_false_alarm_prefix_is_released() -> None:
    detok = IncrementalDetokenizer(stop=("STOP",))
    assert detok.push(b"a ST") == "a "
    assert detok.push(b"AR") == "STAR"
    assert detok.flush() == ""
    assert not detok.stopped


def test_earliest_of_several_stops_wins() -> None:
    detok = IncrementalDetokenizer(stop=("world", "lo"))
    assert detok.push(b"hello world") == "hel"


def test_held_tail_is_released_when_generation_ends() -> None:
    detok = IncrementalDetokenizer(stop=("\n\n",))
    assert detok.push(b"end\n") == "end"
    assert detok.flush() == "\n"
