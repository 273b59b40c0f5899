import numpy as np
import pytest

from ppruntime.engine.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer


class ByteTokenizer:
    """ids 0..255 are bytes; 256 is a special token skipped on decode."""

    SPECIAL = 256

    def __init__(self):
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        self.decoded_lengths.append(len(ids))
        if skip_special_tokens:
            ids = [i for i in ids if i != self.SPECIAL]
        return bytes(ids).decode("utf-8", errors="replace")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def stream(detok, ids, chunk=1):
    return [detok.append(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_deltas_concatenate_to_full_decode(chunk):
    text = "héllo wörld — 日本語 🙂 done"
    ids = encode(text)
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == text
    assert detok.text == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_multibyte_char_held_back_until_complete():
    detok = IncrementalDetokenizer(ByteTokenizer())
    emoji = encode("🙂")  # 4 bytes
    assert detok.append([ord("a")]) == "a"
    assert [detok.append([b]) for b in emoji[:3]] == ["", "", ""]
    assert detok.append(emoji[3:]) == "🙂"
    assert detok.text == "a🙂"


def test_numpy_input_and_prompt_context():
    prompt = np.array(encode("Hi "), dtype=np.int32)
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt_token_ids=prompt)
    assert detok.append(np.array(encode("there"), dtype=np.int32)) == "there"
    assert detok.text == "there"


def test_prompt_ending_mid_character_is_not_emitted():
    ids = encode("é")
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt_token_ids=ids[:1])
    # The continuation byte alone cannot form a character; nothing from the prompt leaks.
    assert "é" not in detok.append(ids[1:]) + detok.flush()


def test_special_tokens_skipped():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    ids = encode("ab") + [tok.SPECIAL] + encode("c")
    assert "".join(stream(detok, ids)) == "abc"


def test_invalid_bytes_are_eventually_emitted():
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = stream(detok, [0xFF] * MAX_PENDING_TOKENS + encode("ok"))
    assert "".join(deltas).endswith("ok")
    assert "\ufffd" in "".join(deltas)


def test_flush_releases_incomplete_tail():
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.append(encode("x") + encode("é")[:1]) == ""
    assert detok.flush() == "x\ufffd"
    assert detok.flush() == ""


def test_decode_window_is_bounded():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    stream(detok, encode("abcdefghij" * 100))
    assert max(tok.decoded_lengths) <= 2 * MAX_PENDING_TOKENS


class ByteLevelTokenizer(ByteTokenizer):
    """The same tokenizer offering token_bytes: the detokenizer's byte path."""

    def token_bytes(self, ids):
        return bytes(i for i in ids if i != self.SPECIAL)


@pytest.mark.parametrize("chunk", [1, 3])
def test_byte_path_equals_the_window_path_without_decoding_windows(chunk):
    rng = np.random.default_rng(0)
    text_ids = encode("héllo wörld — 日本語 🙂 done")
    noisy = text_ids + rng.integers(0, 257, size=200).tolist() + text_ids  # invalid bytes too
    for ids in (text_ids, noisy):
        window, byte_level = ByteTokenizer(), ByteLevelTokenizer()
        by_window = IncrementalDetokenizer(window)
        by_bytes = IncrementalDetokenizer(byte_level, prompt_token_ids=encode("Hi "))
        expected = "".join(stream(by_window, ids, chunk)) + by_window.flush()
        deltas = stream(by_bytes, ids, chunk) + [by_bytes.flush()]
        assert "".join(deltas) == expected == by_bytes.text
        assert byte_level.decoded_lengths == []  # no decode call at all


def test_byte_path_holds_back_an_incomplete_character_until_it_completes():
    detok = IncrementalDetokenizer(ByteLevelTokenizer())
    emoji = encode("🙂")
    assert detok.append([ord("a")]) == "a"
    assert [detok.append([b]) for b in emoji[:3]] == ["", "", ""]
    assert detok.append(np.array(emoji[3:], dtype=np.int32)) == "🙂"
    assert detok.append(encode("é")[:1]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.text == "a🙂\ufffd"


def test_the_byte_tokenizer_offers_its_bytes():
    from ppruntime.model.tokenizer import ByteTokenizer as ModelByteTokenizer

    tokenizer = ModelByteTokenizer(vocab_size=260)
    ids = tokenizer.encode("añ🙂").tolist()  # a BOS first: a special, no bytes
    assert tokenizer.token_bytes(ids) == "añ🙂".encode()
    assert tokenizer.token_bytes(ids).decode() == tokenizer.decode(ids)
