"""Deterministic answers: a function of the messages alone."""

from __future__ import annotations

from gateway.sim.content import answer_tokens, prompt_digest, prompt_token_count

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me a story about a lighthouse."},
]


def test_same_messages_same_answer() -> None:
    assert answer_tokens(MESSAGES, 50) == answer_tokens([dict(m) for m in MESSAGES], 50)
    other = [*MESSAGES[:1], {"role": "user", "content": "Tell me a story about a lamp."}]
    assert answer_tokens(other, 50) != answer_tokens(MESSAGES, 50)


def test_shape_of_tokens() -> None:
    tokens = answer_tokens(MESSAGES, 200)
    assert len(tokens) == 200
    assert not tokens[0].startswith(" ")
    assert all(token.startswith(" ") and len(token) > 1 for token in tokens[1:])


def test_a_shorter_answer_is_a_prefix() -> None:
    assert answer_tokens(MESSAGES, 10) == answer_tokens(MESSAGES, 64)[:10]
    assert answer_tokens(MESSAGES, 0) == []


def test_about_one_token_in_ten_is_multibyte() -> None:
    tokens = answer_tokens(MESSAGES, 2000)
    multibyte = sum(len(token.encode()) != len(token) for token in tokens)
    assert 100 < multibyte < 300
    widths = {len(char.encode()) for token in tokens for char in token}
    assert widths == {1, 2, 3, 4}  # Latin-1, Cyrillic/CJK and emoji all occur


def test_token_size_makes_every_token_exactly_that_long() -> None:
    tokens = answer_tokens(MESSAGES, 100, token_size=37)
    assert {len(token) for token in tokens} == {37}
    assert not tokens[0].startswith(" ") and tokens[1].startswith(" ")
    assert answer_tokens(MESSAGES, 1, token_size=1) == [answer_tokens(MESSAGES, 1)[0][0]]


def test_string_and_block_content_are_the_same_prompt() -> None:
    blocks = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Tell me a story "},
                {"type": "text", "text": "about a lighthouse."},
            ],
        },
    ]
    assert prompt_digest(blocks) == prompt_digest(MESSAGES)
    assert answer_tokens(blocks, 20) == answer_tokens(MESSAGES, 20)


def test_prompt_token_count_counts_words() -> None:
    assert prompt_token_count(MESSAGES) == 3 + 7
