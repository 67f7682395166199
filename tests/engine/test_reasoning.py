"""`<think>` reasoning split from content, whatever the stream's chunking."""

import pytest

from aicc.engine.reasoning import ReasoningSplitter, tag_prefix_len
from tests.engine.chunkings import chunkings


def split(text: str, pieces: list[str], *, starts_in_reasoning: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(starts_in_reasoning)
    reasoning, content = [], []
    for piece in pieces:
        r, c = splitter.push(piece)
        reasoning.append(r)
        content.append(c)
    r, c = splitter.flush()
    return "".join(reasoning) + r, "".join(content) + c


CASES = [
    # (output, starts_in_reasoning, reasoning, content)
    (
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        False,
        "Let me think.",
        "The answer is 4.",
    ),
    ("  \n<think>\nhmm\n</think>\n\nok", False, "hmm", "ok"),
    ("Let me think.\n</think>\n\nThe answer.", True, "Let me think.", "The answer."),
    ("\nstep 1\n\nstep 2\n</think>\n\nDone", True, "step 1\n\nstep 2", "Done"),
    ("Plain answer, no thinking.", False, "", "Plain answer, no thinking."),
    (
        "Answer then <think>not reasoning</think>",
        False,
        "",
        "Answer then <think>not reasoning</think>",
    ),
    ("<think>\nunfinished thought", False, "unfinished thought", ""),
    ("still thinking when cut off\n", True, "still thinking when cut off\n", ""),
    ("<think>\n\n</think>\n\nNo reasoning at all.", False, "", "No reasoning at all."),
    ("</think>\n\nempty", True, "", "empty"),
    ("think: a < b and c </thin k>\n</think>x", True, "think: a < b and c </thin k>", "x"),
    ("Ünïcødé 思考 🤔\n</think>\n\n答案 ✓ </think>", True, "Ünïcødé 思考 🤔", "答案 ✓ </think>"),
    ("<thinking>not the tag", False, "", "<thinking>not the tag"),
    ("<thi", False, "", "<thi"),
    ("  ", False, "", "  "),
    ("", False, "", ""),
    ("", True, "", ""),
    ("a</think>\n\n\n", True, "a", ""),
    ("a</think>\n \nb", True, "a", " \nb"),
]


@pytest.mark.parametrize(("output", "starts_in_reasoning", "reasoning", "content"), CASES)
def test_split_is_the_same_for_every_chunking(
    output: str, starts_in_reasoning: bool, reasoning: str, content: str
) -> None:
    for pieces in chunkings(output):
        assert split(output, pieces, starts_in_reasoning=starts_in_reasoning) == (
            reasoning,
            content,
        ), pieces


def test_reasoning_streams_before_the_close_tag_arrives() -> None:
    splitter = ReasoningSplitter(starts_in_reasoning=True)
    assert splitter.push("First I ") == ("First I ", "")
    assert splitter.push("add.\n</th") == ("add.", "")
    assert splitter.push("ink>\n\nIt is") == ("", "It is")
    assert splitter.push(" 4.") == ("", " 4.")
    assert splitter.flush() == ("", "")


def test_only_a_possible_tag_is_held_back() -> None:
    splitter = ReasoningSplitter(starts_in_reasoning=True)
    assert splitter.push("x <") == ("x ", "")
    assert splitter.push("b") == ("<b", "")
    splitter = ReasoningSplitter(starts_in_reasoning=False)
    assert splitter.push("<") == ("", "")
    assert splitter.push("p>hi") == ("", "<p>hi")


def test_content_is_released_as_soon_as_it_cannot_be_a_think_tag() -> None:
    splitter = ReasoningSplitter(starts_in_reasoning=False)
    assert splitter.push("Hello") == ("", "Hello")
    assert splitter.push(" <think>") == ("", " <think>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("abc</th", 4), ("abc<", 1), ("abc", 0), ("</think>", 0), ("<</", 2), ("", 0)],
)
def test_tag_prefix_len(text: str, expected: int) -> None:
    assert tag_prefix_len(text, ("</think>",)) == expected
