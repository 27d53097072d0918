"""Long texts cut into passages that each fit the model's window.

A text is measured in the model's own tokens (its ``tokenizers`` tokenizer, with offsets)
and cut where it is most natural: before a markdown heading, then at a blank line, then at
a sentence end or line break, then between words, then (text without whitespace: CJK,
token soup) between tokens. From where a chunk starts, the cut goes to the strongest
boundary within reach (the latest of equally strong ones): a chunk ends at a section or
paragraph end even when that leaves it shorter than the budget, but never shorter than a
quarter of it unless it ends at a heading or at the end of the text. Whole small sections
share a chunk; a section start is never overlapped into, so headings anchor the boundaries
and an edit changes only the chunks near it. A chunk cut inside a section starts with the
last ``chunk_overlap`` tokens (or fewer, from a sentence or word start) of the one before.

The text is tokenized in pieces of at most ``PIECE_CHARS`` characters, and chunks are
produced one at a time, so a 10 MB text never becomes one giant token list; past
``max_chunks`` the rest is counted, not kept. A chunk's ``tokens`` is exact: with BERT's
tokenizer a chunk cut between words has the tokens it had in the text; where that may not
hold (a cut inside a word, another tokenizer) the chunk is tokenized again, and cut
shorter if it came out over the budget.
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from tokenizers import Tokenizer

from .errors import ConfigError

if TYPE_CHECKING:  # not at run time: the engine's package loads onnxruntime
    from .engine.resolve import ModelFiles

Splitter = Literal["markdown", "paragraph", "sentence", "word"]
SPLITTERS: tuple[str, ...] = get_args(Splitter)

# The strength of the boundary before a token: lower is stronger. Headings are 0-5 (# to
# ######); END is the end of the text. A splitter other than markdown ignores the stronger
# kinds (paragraph: headings are paragraphs; word: every such boundary is a word boundary).
END = -1
HEADING = 5  # the weakest heading (######)
PARAGRAPH = 6
SENTENCE = 7  # a sentence end or a line break
WORD = 8  # whitespace between
SYMBOL = 9  # no whitespace, but another word: punctuation, CJK characters
TOKEN = 10  # inside a word
_FLOOR = {"markdown": 0, "paragraph": PARAGRAPH, "sentence": SENTENCE, "word": WORD}

# Measured (benchmarks/bench_chunking.py, docs/drafts/chunking.md): 128-token chunks found
# no more pages than 256-token ones, with 1.8x the chunks; overlap added chunks, not hits
DEFAULT_CHUNK_TOKENS = 256  # capped by the model's window
DEFAULT_CHUNK_OVERLAP = 0
DEFAULT_MAX_CHUNKS = 2000
MIN_CHUNK_TOKENS = 16
PIECE_CHARS = 32_768  # the most text tokenized at once
MIN_FILL = 4  # a chunk not ending at a heading or the end holds >= 1/MIN_FILL of the budget

_HEADING_RE = re.compile(r"(#{1,6})[ \t]")
_FENCES = ("```", "~~~")
_SENTENCE_ENDS = frozenset(".!?")
_CJK_ENDS = frozenset("\u3002\uff01\uff1f")  # ideographic full stop, fullwidth ! and ?
_CLOSERS = frozenset("\"')]\u201d\u2019\u00bb")


def text_hash(text: str) -> int:
    """A stable 64-bit hash of ``text`` (blake2b of its UTF-8), signed: fits a bigint."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One passage: ``text == source[start:end]``."""

    index: int  # position in the text, from 0
    start: int  # character offsets in the source text
    end: int
    text: str
    tokens: int  # the model's tokens of ``text``, special tokens and template not counted
    hash: int  # text_hash(text)


@dataclass(frozen=True)
class Chunks:
    """The chunks of one text, at most ``max_chunks`` of them."""

    chunks: list[Chunk]
    dropped: int  # chunks past max_chunks, counted but not returned


def _check_int(name: str, value: object, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, not {value}")


def _check_overlap(overlap: int, chunk_tokens: int) -> None:
    if overlap >= chunk_tokens:
        raise ConfigError(
            f"chunk_overlap ({overlap}) must be less than chunk_tokens ({chunk_tokens})"
        )


@dataclass(frozen=True)
class ChunkOptions:
    """How to cut. ``chunk_tokens=None``: the default, capped by the model's window."""

    chunk_tokens: int | None = None
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    splitter: Splitter = "markdown"
    max_chunks: int = DEFAULT_MAX_CHUNKS

    def __post_init__(self) -> None:
        if self.chunk_tokens is not None:
            _check_int("chunk_tokens", self.chunk_tokens, MIN_CHUNK_TOKENS)
        _check_int("chunk_overlap", self.chunk_overlap, 0)
        _check_int("max_chunks", self.max_chunks, 1)
        if self.splitter not in SPLITTERS:
            raise ConfigError(
                f"splitter must be one of {', '.join(SPLITTERS)}, not {self.splitter!r}"
            )
        if self.chunk_tokens is not None:
            _check_overlap(self.chunk_overlap, self.chunk_tokens)

    @classmethod
    def from_mapping(cls, options: Mapping[str, object]) -> ChunkOptions:
        """From stored settings (e.g. JSON); unknown keys are refused."""
        unknown = sorted(set(options) - {"chunk_tokens", "chunk_overlap", "splitter", "max_chunks"})
        if unknown:
            raise ConfigError(f"unknown chunking option(s): {', '.join(unknown)}")
        return cls(**options)  # type: ignore[arg-type]  # values checked in __post_init__


class _Tokens:
    """The tokens of one text, read piece by piece: start offsets and boundary strengths,
    kept from token ``base`` on (the caller drops what it no longer needs)."""

    def __init__(self, tok: Tokenizer, text: str, floor: int) -> None:
        self.tok, self.text, self.floor = tok, text, floor
        self.starts: list[int] = []
        self.strengths: list[int] = []  # of the boundary before each token
        self.base = 0  # token index of starts[0]
        self.pos = 0  # characters read
        self.prev_end = -1  # end of the last token read (-1: none yet)
        self.fence = False  # inside a ``` block: no headings there
        self.hard: list[int] = []  # tokens after a piece cut inside a word

    @property
    def known(self) -> int:
        return self.base + len(self.starts)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.text)

    def ensure(self, k: int) -> None:
        """Read on until token ``k`` is known or the text ends."""
        while self.known <= k and not self.done:
            self._read()

    def start(self, k: int) -> int:
        """Character where token ``k`` starts (the end of the text past the last token)."""
        return self.starts[k - self.base] if k < self.known else len(self.text)

    def strength(self, k: int) -> int:
        return self.strengths[k - self.base] if k < self.known else END

    def segment(self, lo: int, hi: int) -> list[int]:
        """Strengths of the boundaries before tokens lo..hi (hi <= known; known: END)."""
        seg = self.strengths[lo - self.base : hi + 1 - self.base]
        return [*seg, END] if hi >= self.known else seg

    def drop_before(self, k: int) -> None:
        if k - self.base > 4096:
            del self.starts[: k - self.base], self.strengths[: k - self.base]
            self.base = k

    def _read(self) -> None:
        text, pos = self.text, self.pos
        end = len(text)
        if end - pos > PIECE_CHARS:  # cut at whitespace in the window's second half
            lo, hi = pos + PIECE_CHARS // 2, pos + PIECE_CHARS
            end = next((i for sep in ("\n\n", "\n", " ") if (i := text.rfind(sep, lo, hi)) > 0), hi)
        enc = self.tok.encode(text[pos:end], add_special_tokens=False)
        if pos and not text[pos - 1].isspace() and not text[pos].isspace():
            self.hard.append(self.known)  # the previous piece was cut inside a word
        self.pos = end
        prev_end, fence, floor = self.prev_end, self.fence, self.floor
        starts, strengths = self.starts, self.strengths
        prev_word, prev_start = None, -1
        for (rel_start, rel_end), word in zip(enc.offsets, enc.word_ids, strict=True):
            a = rel_start + pos
            if a <= prev_start:  # bytes of one character (byte-level BPE): one unit
                prev_end = max(prev_end, rel_end + pos)
                continue
            prev_start = a
            if prev_end < 0:  # the first token: the start of the text is a line start
                newlines, prev_end = 1, a
            else:
                newlines = text.count("\n", prev_end, a) if a > prev_end else 0
            if newlines:
                if text.startswith(_FENCES, a):
                    fence = not fence
                heading = None if fence else _HEADING_RE.match(text, a)
                if heading:
                    strength = len(heading.group(1)) - 1
                else:
                    strength = PARAGRAPH if newlines > 1 else SENTENCE
            elif a > prev_end:  # whitespace between
                last = text[prev_end - 1]
                if last in _CLOSERS and prev_end > 1:
                    last = text[prev_end - 2]
                strength = SENTENCE if last in _SENTENCE_ENDS or last in _CJK_ENDS else WORD
            elif text[prev_end - 1] in _CJK_ENDS:
                strength = SENTENCE
            else:
                strength = TOKEN if word == prev_word else SYMBOL
            starts.append(a)
            strengths.append(strength if strength > floor else floor)
            prev_end = max(prev_end, rel_end + pos)
            prev_word = word
        self.prev_end, self.fence = prev_end, fence


def _latest(values: list[int], value: int) -> int:
    return len(values) - 1 - values[::-1].index(value)


class Chunker:
    """Cuts texts for one model's tokenizer and window (``max_tokens``, specials included)."""

    def __init__(
        self, tokenizer: Tokenizer, max_tokens: int, options: ChunkOptions | None = None
    ) -> None:
        # a private copy: the engine's tokenizer truncates at the window, this one must not
        spec = tokenizer.to_str()
        self._tok = Tokenizer.from_str(spec)
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_tokens = max_tokens
        self.specials = int(self._tok.num_special_tokens_to_add(False))
        opts = options or ChunkOptions()
        room = max_tokens - self.specials
        self.chunk_tokens = opts.chunk_tokens or min(DEFAULT_CHUNK_TOKENS, room)
        if self.chunk_tokens > room:
            raise ConfigError(
                f"chunk_tokens ({self.chunk_tokens}) must be at most {room}: the model "
                f"reads {max_tokens} tokens, {self.specials} of them special"
            )
        _check_overlap(opts.chunk_overlap, self.chunk_tokens)
        self.chunk_overlap = opts.chunk_overlap
        # BERT's pre-tokenizer splits at whitespace and punctuation, and WordPiece reads each
        # word alone: a chunk cut between two words has as many tokens as it had in the text
        parts = json.loads(spec)
        pre, model = parts.get("pre_tokenizer") or {}, parts.get("model") or {}
        self._additive = pre.get("type") == "BertPreTokenizer" and model.get("type") == "WordPiece"
        self.splitter = opts.splitter
        self.max_chunks = opts.max_chunks

    @classmethod
    def for_model(cls, files: ModelFiles, options: ChunkOptions | None = None) -> Chunker:
        """For a resolved model (``resolve(name)``, or an embedder's ``.files``)."""
        return cls(Tokenizer.from_file(str(files.tokenizer)), files.max_tokens, options)

    def count_tokens(self, text: str) -> int:
        """The model's tokens of ``text``, special tokens not counted."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def template_overhead(self, template: str, **fields: str) -> int:
        """The tokens a template such as ``"{title}\\n\\n{chunk}"`` adds around each chunk:
        pass it as ``reserved_tokens``. (Keep whitespace or punctuation next to ``{chunk}``
        so that the template's tokens and the chunk's stay apart.)"""
        return self.count_tokens(template.format(chunk="", **fields))

    def budget(self, reserved_tokens: int = 0) -> int:
        """The most tokens a chunk may hold when ``reserved_tokens`` go to a template."""
        _check_int("reserved_tokens", reserved_tokens, 0)
        budget = min(self.chunk_tokens, self.max_tokens - self.specials - reserved_tokens)
        if budget <= self.chunk_overlap or budget < MIN_CHUNK_TOKENS:
            raise ConfigError(
                f"the template takes {reserved_tokens} of the model's {self.max_tokens} "
                f"tokens, leaving {budget} for each chunk: at least "
                f"{max(MIN_CHUNK_TOKENS, self.chunk_overlap + 1)} are needed "
                "(shorten the template or lower chunk_overlap)"
            )
        return budget

    def chunk(self, text: str, reserved_tokens: int = 0) -> Chunks:
        """The first ``max_chunks`` chunks of ``text``, and how many more there were."""
        kept: list[Chunk] = []
        dropped = 0
        for c in self.iter_chunks(text, reserved_tokens):
            if len(kept) < self.max_chunks:
                kept.append(c)
            else:
                dropped += 1
        return Chunks(kept, dropped)

    def iter_chunks(self, text: str, reserved_tokens: int = 0) -> Iterator[Chunk]:
        """All chunks of ``text``, in order, one at a time. A text without tokens (empty,
        whitespace) has none."""
        budget = self.budget(reserved_tokens)
        toks = _Tokens(self._tok, text, _FLOOR[self.splitter])
        s, prev, index = 0, 0, 0  # chunk start; previous cut, which the next must pass
        toks.ensure(0)
        if not toks.known:
            return
        while True:
            limit = budget
            while True:
                c = self._cut(toks, s, max(prev, s) + 1, limit, budget // MIN_FILL)
                start = toks.start(s) if index else 0
                end = toks.start(c)
                piece = text[start:end]
                if not self._needs_count(toks, s, c):
                    n = c - s
                    break
                n = self.count_tokens(piece)
                if n <= budget or c - s <= 1:
                    break
                # re-tokenized longer (cut inside a word): shorter, then without overlap
                limit = c - s - (n - budget)
                if s + limit <= prev:
                    s, limit = (prev, budget) if s < prev else (s, 1)
            yield Chunk(index, start, end, piece, n, text_hash(piece))
            if c >= toks.known:  # _cut has read on to c: known == c is the end
                return
            index, prev = index + 1, c
            s = self._overlap_start(toks, s, c) if self.chunk_overlap else c
            toks.drop_before(s)

    def _needs_count(self, toks: _Tokens, s: int, c: int) -> bool:
        """Whether tokens s..c-1 may re-tokenize to another count than c - s: always
        unless the tokenizer splits words apart (BERT's), else where a cut falls inside a
        word or the chunk spans a piece cut inside one."""
        return (
            not self._additive
            or (s > 0 and toks.strength(s) == TOKEN)
            or (c < toks.known and toks.strength(c) == TOKEN)
            or ((i := bisect_right(toks.hard, s)) < len(toks.hard) and toks.hard[i] < c)
        )

    @staticmethod
    def _cut(toks: _Tokens, s: int, lo: int, limit: int, min_fill: int) -> int:
        """Where the chunk that starts at token ``s`` ends: the strongest boundary before
        token k, lo <= k <= s + limit (the latest of equally strong ones); boundaries other
        than headings and the end count only from s + min_fill on."""
        toks.ensure(s + limit)
        seg = toks.segment(lo, min(s + limit, toks.known))
        split = min(max(s + min_fill - lo, 0), len(seg) - 1)
        late = seg[split:]
        best = min(late)
        early = min(seg[:split], default=TOKEN + 1)
        if early < best and early <= HEADING:
            return lo + _latest(seg[:split], early)
        return lo + split + _latest(late, best)

    def _overlap_start(self, toks: _Tokens, s: int, c: int) -> int:
        """Where the chunk after a cut before token ``c`` starts: at c when that is a
        heading; else at the earliest sentence start, else word start, else token, of the
        chunk's last ``chunk_overlap`` tokens (they hold no heading: one in reach is
        always where the cut falls)."""
        lo = max(s + 1, c - self.chunk_overlap)
        if toks.strength(c) <= HEADING or lo >= c:
            return c
        seg = toks.segment(lo, c - 1)
        o = lo + next(
            j for level in (SENTENCE, WORD, SYMBOL, TOKEN) for j, v in enumerate(seg) if v <= level
        )
        # counted again where the text's tokens may differ from the overlap's own
        end = toks.start(c)
        while o < c and self._needs_count(toks, o, c):
            if self.count_tokens(toks.text[toks.start(o) : end]) <= self.chunk_overlap:
                break
            o += 1
        return o
