"""Chunking with the real tokenizers of all-MiniLM-L6-v2 (256 tokens) and gte-small (512)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from autoembed.chunking import (
    PIECE_CHARS,
    Chunk,
    Chunker,
    ChunkOptions,
    text_hash,
)
from autoembed.errors import ConfigError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

DATA = Path(__file__).resolve().parent / "data"
PAGE = json.loads((DATA / "pgdocs-page-copy.json").read_text(encoding="utf-8"))
BODY: str = PAGE["body"]
TEMPLATE = "{title}\n\n{chunk}"
WORDS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]  # a token each


def prose(chars: int) -> str:
    """The page's text again and again: sections, paragraphs and sentences."""
    return (BODY * (chars // len(BODY) + 1))[:chars]


def soup(chars: int) -> str:
    """No whitespace at all: short words joined by punctuation (minified-code-like)."""
    rng = random.Random(7)
    words = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 9))) for _ in range(300)]
    return "".join(rng.choice(words) + rng.choice(".,-/:;=_") for _ in range(chars // 5))[:chars]


def cjk(chars: int) -> str:
    sentence = "数据库管理员可以使用这个功能来备份和恢复数据。"
    return (sentence * (chars // len(sentence) + 1))[:chars]


@pytest.fixture(scope="session")
def minilm_tokenizer(cache_dir: Path) -> Tokenizer:
    from autoembed.engine.resolve import resolve

    return Tokenizer.from_file(str(resolve("all-minilm-l6-v2").tokenizer))


@pytest.fixture(scope="session")
def gte_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DATA / "gte-small" / "tokenizer.json"))


@pytest.fixture(scope="session", params=["all-minilm-l6-v2", "gte-small"])
def model(request: pytest.FixtureRequest) -> tuple[Tokenizer, int]:
    if request.param == "gte-small":
        return request.getfixturevalue("gte_tokenizer"), 512
    return request.getfixturevalue("minilm_tokenizer"), 256


class Check:
    """Counts tokens as the engine will: the whole text, special tokens included."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = Tokenizer.from_str(tokenizer.to_str())
        self.tok.no_truncation()
        self.tok.no_padding()

    def tokens(self, text: str, specials: bool = False) -> int:
        return len(self.tok.encode(text, add_special_tokens=specials).ids)

    def chunks(self, ck: Chunker, text: str, chunks: list[Chunk], window: int) -> None:
        """Every promise that holds for any text."""
        for i, c in enumerate(chunks):
            assert c.index == i
            assert text[c.start : c.end] == c.text
            assert c.hash == text_hash(c.text)
            assert self.tokens(c.text) == c.tokens
            assert self.tokens(c.text, specials=True) <= window
            assert c.tokens <= ck.chunk_tokens
        if not chunks:
            assert self.tokens(text) == 0
            return
        assert chunks[0].start == 0 and chunks[-1].end == len(text)  # the whole text...
        for a, b in itertools.pairwise(chunks):
            assert a.start < b.start <= a.end < b.end  # ...without gaps, always forward
            assert self.tokens(text[b.start : a.end]) <= ck.chunk_overlap


def texts(budget: int) -> Iterator[tuple[str, str, int | None]]:
    """(name, text, expected number of chunks or None)"""
    yield "empty", "", 0
    yield "whitespace", " \n\n\t ", 0
    yield "one word", "PostgreSQL", 1
    yield "exactly the budget", " ".join(WORDS[i % 10] for i in range(budget)), 1
    yield "one token over", " ".join(WORDS[i % 10] for i in range(budget + 1)), 2
    yield "100k characters", prose(100_000), None
    yield "no whitespace", soup(100_000), None
    yield "CJK without spaces", cjk(20_000), None
    yield "markdown page", BODY, None


@pytest.mark.parametrize("overlap", [0, 32])
def test_texts_of_every_size(model: tuple[Tokenizer, int], overlap: int) -> None:
    """Chunks as long as the window allows: "exactly the budget" is exactly the window."""
    tokenizer, window = model
    ck = Chunker(tokenizer, window, ChunkOptions(chunk_tokens=window - 2, chunk_overlap=overlap))
    check = Check(tokenizer)
    for name, text, expected in texts(ck.chunk_tokens):
        chunks = ck.chunk(text).chunks
        check.chunks(ck, text, chunks, window)
        if expected is not None:
            assert len(chunks) == expected, name
    exact = " ".join(WORDS[i % 10] for i in range(ck.chunk_tokens))
    assert check.tokens(exact, specials=True) == window


def test_defaults(model: tuple[Tokenizer, int]) -> None:
    tokenizer, window = model
    ck = Chunker(tokenizer, window)
    assert (ck.chunk_tokens, ck.chunk_overlap, ck.splitter, ck.max_chunks) == (
        min(256, window - 2),
        0,
        "markdown",
        2000,
    )
    Check(tokenizer).chunks(ck, BODY, ck.chunk(BODY).chunks, window)


@pytest.mark.parametrize("overlap", [0, 4])
def test_small_chunks_cut_inside_words(gte_tokenizer: Tokenizer, overlap: int) -> None:
    """Words longer than a 16-token chunk are cut between their word pieces, where a
    chunk's tokens are counted again; every chunk still fits."""
    ck = Chunker(gte_tokenizer, 512, ChunkOptions(chunk_tokens=16, chunk_overlap=overlap))
    check = Check(gte_tokenizer)
    rng = random.Random(3)
    text = " ".join("".join(rng.choices("bcdfghjklmnpqrstvwxz", k=90)) for _ in range(200))
    chunks = ck.chunk(text).chunks
    check.chunks(ck, text, chunks, 16 + 2)
    assert len(chunks) > 200
    inside = [c for c in chunks if c.start and text[c.start - 1] != " "]
    assert len(inside) > 100


def test_template_overhead_and_reserved_tokens(model: tuple[Tokenizer, int]) -> None:
    tokenizer, window = model
    ck = Chunker(tokenizer, window, ChunkOptions(chunk_tokens=window - 2))
    check = Check(tokenizer)
    title = "COPY — copy data between a file and a table " * 3
    reserved = ck.template_overhead(TEMPLATE, title=title)
    assert reserved == check.tokens(title)
    assert ck.budget(reserved) == window - 2 - reserved
    chunks = ck.chunk(BODY, reserved_tokens=reserved).chunks
    assert 0.8 * ck.budget(reserved) < max(c.tokens for c in chunks) <= ck.budget(reserved)
    for c in chunks:
        rendered = TEMPLATE.format(title=title, chunk=c.text)
        assert check.tokens(rendered, specials=True) <= window


def sections(text: str) -> list[tuple[int, int]]:
    starts = [0, *(m.start() for m in re.finditer(r"^#{1,6} ", text, re.M)), len(text)]
    return [(a, b) for a, b in itertools.pairwise(starts) if b > a]


def test_sections_that_fit_stay_whole_and_anchor_chunks(model: tuple[Tokenizer, int]) -> None:
    tokenizer, window = model
    check = Check(tokenizer)
    ck = Chunker(tokenizer, window, ChunkOptions(chunk_overlap=32))
    chunks = ck.chunk(BODY).chunks
    fitting = [(a, b) for a, b in sections(BODY) if check.tokens(BODY[a:b]) <= ck.chunk_tokens]
    assert len(fitting) >= 5
    for a, b in fitting:
        assert any(c.start <= a and b <= c.end for c in chunks), BODY[a : a + 40]
    # no overlap reaches back over a heading
    headings = [a for a, _ in sections(BODY)]
    for x, y in itertools.pairwise(chunks):
        assert not [h for h in headings if y.start < h <= x.end]
    # cut by words alone, some of those sections are split
    words = Chunker(tokenizer, window, ChunkOptions(splitter="word"))
    by_words = words.chunk(BODY).chunks
    assert any(not any(c.start <= a and b <= c.end for c in by_words) for a, b in fitting)


def test_paragraph_then_sentence_ends_preferred(gte_tokenizer: Tokenizer) -> None:
    rng = random.Random(1)
    sentences = [s.strip() + "." for s in re.split(r"\.\s", BODY.replace("\n", " ")) if s]
    sentences = [s for s in sentences if 5 < len(s) < 200]
    paragraphs = [" ".join(rng.sample(sentences, 3)) for _ in range(40)]
    ck = Chunker(gte_tokenizer, 512, ChunkOptions(chunk_tokens=200, chunk_overlap=0))
    text = "\n\n".join(paragraphs)
    chunks = ck.chunk(text).chunks
    assert all(c.text.endswith("\n\n") for c in chunks[:-1])
    assert any(c.tokens < 150 for c in chunks)  # shorter, to end at a paragraph end
    sentence_end = re.compile(r"[.!?][\"')\]]?\s*$")
    one = " ".join(paragraphs)  # one paragraph: sentence ends
    chunks = ck.chunk(one).chunks
    assert all(sentence_end.search(c.text) for c in chunks)
    for splitter in ("paragraph", "sentence"):  # sentence ends are still preferred
        opts = ChunkOptions(chunk_tokens=200, chunk_overlap=0, splitter=splitter)
        chunks = Chunker(gte_tokenizer, 512, opts).chunk(text).chunks
        assert all(sentence_end.search(c.text) for c in chunks)


def test_no_headings_inside_code_fences(gte_tokenizer: Tokenizer) -> None:
    """A ``# comment`` in a fenced block is not a heading: the block stays whole."""
    sentences = re.split(r"(?<=\.) ", " ".join(BODY.split()))
    paragraph = " ".join(sentences[:3])
    fence = "```sh\n# make the table\npsql -c 'create table t (a int)'\n# load it\n```\n\n"
    text = f"## Loading\n\n{paragraph}\n\n{fence}{paragraph}\n\n{fence}{paragraph}"
    ck = Chunker(gte_tokenizer, 512, ChunkOptions(chunk_tokens=64, chunk_overlap=0))
    chunks = ck.chunk(text).chunks
    assert [c.text for c in chunks].count(fence) == 2


def test_cjk_cut_at_sentence_ends(gte_tokenizer: Tokenizer) -> None:
    spaced = "数据库管理员 可以使用 这个功能 来备份和恢复数据。 " * 200
    for text in (cjk(5_000), spaced):
        chunks = Chunker(gte_tokenizer, 512).chunk(text).chunks
        assert len(chunks) > 10
        assert all(c.text.rstrip().endswith("。") for c in chunks[:-1])


def test_chunks_hold_a_quarter_of_the_budget_unless_they_end_a_section(
    gte_tokenizer: Tokenizer,
) -> None:
    ck = Chunker(gte_tokenizer, 512, ChunkOptions(chunk_tokens=160))
    text = prose(60_000)
    heading_starts = {a for a, _ in sections(text)}
    short = [c for c in ck.chunk(text).chunks if c.tokens < 160 // 4]
    assert all(c.end in heading_starts or c.end == len(text) for c in short)


def test_overlap(gte_tokenizer: Tokenizer) -> None:
    check = Check(gte_tokenizer)
    paragraph = " ".join(BODY.split())  # one long paragraph, no headings
    ck = Chunker(gte_tokenizer, 512, ChunkOptions(chunk_tokens=128, chunk_overlap=24))
    chunks = ck.chunk(paragraph).chunks
    check.chunks(ck, paragraph, chunks, 512)
    for a, b in itertools.pairwise(chunks):
        shared = paragraph[b.start : a.end]
        assert 1 <= check.tokens(shared) <= 24
        assert paragraph[b.start - 1] == " "  # starts at a word
    none = Chunker(gte_tokenizer, 512, ChunkOptions(chunk_tokens=128, chunk_overlap=0))
    tiled = none.chunk(paragraph).chunks
    assert "".join(c.text for c in tiled) == paragraph


def test_hashes_are_stable_across_processes() -> None:
    texts = ["", "hello", BODY[:500], "数据库"]
    code = (
        "import json, sys; from autoembed.chunking import text_hash; "
        "print(json.dumps([text_hash(t) for t in json.loads(sys.stdin.read())]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    ours = [text_hash(t) for t in texts]
    assert json.loads(other.stdout) == ours
    assert len(set(ours)) == len(ours)
    assert all(-(2**63) <= h < 2**63 for h in ours)
    # pinned: hashes are stored, so the function must never change
    assert text_hash("hello") == -6361636117772159875


def test_one_sentence_edit_changes_few_chunks(model: tuple[Tokenizer, int]) -> None:
    tokenizer, window = model
    text = prose(60_000)
    at = text.find(". ", len(text) // 2) + 2
    edited = text[:at] + "This sentence was added by an edit. " + text[at:]

    def new_chunks(splitter: Any) -> tuple[int, int]:
        ck = Chunker(tokenizer, window, ChunkOptions(splitter=splitter))
        before = {c.hash for c in ck.chunk(text).chunks}
        after = ck.chunk(edited).chunks
        return sum(c.hash not in before for c in after), len(after)

    changed, total = new_chunks("markdown")
    assert total > 40
    assert 1 <= changed <= 3
    changed, total = new_chunks("word")  # fixed windows: every chunk after the edit shifts
    assert changed > total // 3


def test_cap_counts_dropped_chunks(minilm_tokenizer: Tokenizer) -> None:
    text = prose(100_000)
    everything = list(Chunker(minilm_tokenizer, 256).iter_chunks(text))
    capped = Chunker(minilm_tokenizer, 256, ChunkOptions(max_chunks=5)).chunk(text)
    assert capped.chunks == everything[:5]
    assert capped.dropped == len(everything) - 5 > 0
    assert Chunker(minilm_tokenizer, 256).chunk(text).dropped == 0


class Recording:
    """A tokenizer stand-in that records how much text each call tokenized."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.sizes = tok, list[int]()

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        self.sizes.append(len(text))
        return self.tok.encode(text, add_special_tokens=add_special_tokens)


def test_long_texts_are_read_in_pieces(gte_tokenizer: Tokenizer) -> None:
    text = prose(2_000_000)
    ck = Chunker(gte_tokenizer, 512)
    ck._tok = recording = Recording(ck._tok)  # type: ignore[assignment]
    first = next(ck.iter_chunks(text))  # the first chunk reads the first piece only
    assert first.start == 0 and sum(recording.sizes) <= PIECE_CHARS
    tracemalloc.start()
    try:
        n = sum(1 for _ in ck.iter_chunks(text[:400_000]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(recording.sizes) <= PIECE_CHARS
    assert n > 300
    # 400k characters are ~90k tokens: their offsets alone, all at once, would take more
    assert peak < 4_000_000


def test_any_tokenizer(gte_tokenizer: Tokenizer) -> None:
    """A byte-level BPE (GPT-2 style, no special tokens): every chunk is counted again."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([BODY], trainers.BpeTrainer(vocab_size=600, show_progress=False))
    ck = Chunker(bpe, 128, ChunkOptions(chunk_overlap=16))
    assert ck.specials == 0 and ck.chunk_tokens == 128
    for text in (BODY, soup(20_000), cjk(3_000)):
        Check(bpe).chunks(
            ck,
            text,
            ck.chunk(text).chunks,
            128,
        )


def test_options_are_checked(minilm_tokenizer: Tokenizer) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"chunk_overlap": 64, "chunk_tokens": 64}, "chunk_overlap (64) must be less than"),
        ({"chunk_tokens": 8}, "chunk_tokens must be at least 16"),
        ({"chunk_overlap": -1}, "chunk_overlap must be at least 0"),
        ({"chunk_tokens": True}, "chunk_tokens must be an integer"),
        ({"splitter": "html"}, "splitter must be one of markdown, paragraph, sentence, word"),
        ({"max_chunks": 0}, "max_chunks must be at least 1"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ChunkOptions(**options)
    with pytest.raises(ConfigError, match=re.escape("chunk_tokens (255) must be at most 254")):
        Chunker(minilm_tokenizer, 256, ChunkOptions(chunk_tokens=255))
    with pytest.raises(ConfigError, match=re.escape("chunk_overlap (254) must be less than")):
        Chunker(minilm_tokenizer, 256, ChunkOptions(chunk_overlap=254))
    ck = Chunker(minilm_tokenizer, 256, ChunkOptions(chunk_overlap=32))
    with pytest.raises(ConfigError, match="the template takes 230 .* leaving 24 .* at least 33"):
        ck.chunk("text", reserved_tokens=230)
    with pytest.raises(ConfigError, match="reserved_tokens must be at least 0"):
        ck.chunk("text", reserved_tokens=-1)
    with pytest.raises(ConfigError, match="unknown chunking option"):
        ChunkOptions.from_mapping({"chunk_size": 100})
    opts = ChunkOptions.from_mapping({"chunk_tokens": 100, "splitter": "sentence"})
    assert opts == ChunkOptions(chunk_tokens=100, splitter="sentence")


def test_for_model(cache_dir: Path) -> None:
    from autoembed.engine.resolve import resolve

    ck = Chunker.for_model(resolve("all-minilm-l6-v2"))
    assert (ck.max_tokens, ck.specials, ck.chunk_tokens) == (256, 2, 254)
