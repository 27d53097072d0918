"""Chunking: throughput, retrieval with and without chunks, edit stability, a 10 MB text.

    nice -n 10 python benchmarks/bench_chunking.py | tee benchmarks/results/chunking.txt

(a) chunking throughput on the whole pages corpus (all-MiniLM-L6-v2's window and
    gte-small's); (b) hit@10 by page for the questions in benchmarks/questions/pages.jsonl
    (each about a section that starts past the page's first 3,000 characters): one vector
    per page (the engine truncates at the window) versus the best chunk of each page, for a
    few chunk sizes and overlaps, embedded in memory with all-MiniLM-L6-v2, numpy cosine;
    (c) the share of chunks whose hash changes after a one-sentence edit in the middle of
    each page of 20,000 characters or more; (d) a 10 MB text (documentation, CJK, token
    soup): time, chunks kept and dropped, peak RSS of a fresh process while it chunks.

Embeddings are cached by text in the model cache (bench-chunking/), so a second run with
other sizes embeds only the chunks it has not seen.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoembed.chunking import Chunker, ChunkOptions, Splitter, text_hash
from autoembed.engine import Embedder
from autoembed.engine.resolve import cache_root, resolve
from tokenizers import Tokenizer

from benchmarks.common import GTE_FILES, cores

ROOT = Path(__file__).resolve().parent.parent
PAGES = Path("/work/shared/corpus/pgdocs-pages.jsonl")
QUESTIONS = ROOT / "benchmarks" / "questions" / "pages.jsonl"
TEMPLATE = "{title}\n\n{chunk}"
EDIT = "This sentence was added in the middle of the page by an edit. "


def load_pages(path: Path) -> list[dict[str, str | int]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gte_chunker(options: ChunkOptions | None = None) -> Chunker:
    return Chunker(Tokenizer.from_file(str(GTE_FILES / "tokenizer.json")), 512, options)


# (a) ------------------------------------------------------------------------------------


def throughput(pages: list[dict[str, str | int]], minilm: Chunker) -> None:
    bodies = [str(p["body"]) for p in pages]
    tokens = sum(minilm.count_tokens(b) for b in bodies)
    chars = sum(len(b) for b in bodies)
    print(f"\n(a) throughput: {len(bodies)} pages, {chars / 1e6:.2f} M characters, {tokens} tokens")
    for name, ck in (("all-minilm-l6-v2", minilm), ("gte-small", gte_chunker())):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            n = sum(len(ck.chunk(b).chunks) for b in bodies)
            best = min(best, time.perf_counter() - start)
        print(
            f"  {name:17s} chunk_tokens {ck.chunk_tokens} overlap {ck.chunk_overlap}: "
            f"{n} chunks, {best:.2f} s (best of 3): {len(bodies) / best:,.0f} pages/s, "
            f"{tokens / best:,.0f} tokens/s, {chars / best / 1e6:.2f} M chars/s"
        )


# (b) ------------------------------------------------------------------------------------


class Vectors:
    """Embeddings of texts, cached on disk by text hash."""

    def __init__(self, emb: Embedder, path: Path) -> None:
        self.emb, self.path = emb, path
        self.cache: dict[int, np.ndarray] = {}
        if path.is_file():
            data = np.load(path)
            self.cache = dict(zip(data["keys"].tolist(), data["vectors"], strict=True))
        self.embedded = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        keys = [text_hash(t) for t in texts]
        missing = list(
            {k: t for k, t in zip(keys, texts, strict=True) if k not in self.cache}.items()
        )
        for i in range(0, len(missing), 2048):
            part = missing[i : i + 2048]
            for (k, _), v in zip(part, self.emb.embed([t for _, t in part]), strict=True):
                self.cache[k] = v
            self.embedded += len(part)
            self.save()
        return np.stack([self.cache[k] for k in keys])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.fromiter(self.cache, dtype=np.int64, count=len(self.cache))
        np.savez(self.path, keys=keys, vectors=np.stack(list(self.cache.values())))


def score(sims: np.ndarray, owner: np.ndarray, targets: np.ndarray, n_pages: int) -> str:
    """hit@1, hit@10 and MRR@10 by page: a page scores its best vector."""
    best = np.full((sims.shape[0], n_pages), -np.inf, dtype=np.float32)
    for col in range(n_pages):
        cols = owner == col
        if cols.any():
            best[:, col] = sims[:, cols].max(axis=1)
    target = best[np.arange(len(targets)), targets]
    rank = (best > target[:, None]).sum(axis=1) + 1
    hit1, hit10 = (rank <= 1).mean(), (rank <= 10).mean()
    mrr = np.where(rank <= 10, 1.0 / rank, 0.0).mean()
    return f"hit@1 {hit1:.3f}  hit@10 {hit10:.3f}  MRR@10 {mrr:.3f}"


def retrieval(pages: list[dict[str, str | int]], questions: list[dict[str, str | int]]) -> None:
    emb = Embedder.load("all-minilm-l6-v2", device="cpu")
    vectors = Vectors(emb, cache_root() / "bench-chunking" / "all-minilm-l6-v2.npz")
    index = {int(p["id"]): i for i, p in enumerate(pages)}
    for q in questions:  # the question set's promise: sections past the first 3,000 chars
        body = str(pages[index[int(q["page_id"])]]["body"])
        assert body.find(f"## {q['section']}\n") == int(q["section_start"]) >= 3000, q
    targets = np.array([index[int(q["page_id"])] for q in questions])
    qv = vectors([str(q["question"]) for q in questions])
    print(
        f"\n(b) retrieval: {len(questions)} questions on {len(set(targets.tolist()))} pages, "
        f"all {len(pages)} pages indexed; all-minilm-l6-v2 (256-token window), "
        f"template {TEMPLATE!r}, cosine, a page ranks by its best vector"
    )
    texts = [TEMPLATE.format(title=p["title"], chunk=p["body"]) for p in pages]
    start = time.perf_counter()
    pv = vectors(texts)
    print(f"  {'one vector per page (truncated)':54s} {len(texts):6d} vectors  ", end="")
    print(score(qv @ pv.T, np.arange(len(pages)), targets, len(pages)))
    configs: list[tuple[Splitter, int | None, int]] = [
        ("markdown", None, 0),
        ("markdown", None, 32),
        ("markdown", 128, 0),
        ("markdown", 128, 16),
        ("word", None, 32),
    ]
    base = Chunker.for_model(emb.files)
    reserved = [base.template_overhead(TEMPLATE, title=str(p["title"])) for p in pages]
    print(f"  (the title takes {np.mean(reserved):.1f} tokens of each chunk's budget on average)")
    for splitter, size, overlap in configs:
        opts = ChunkOptions(chunk_tokens=size, chunk_overlap=overlap, splitter=splitter)
        ck = Chunker.for_model(emb.files, opts)
        texts, owner = [], []
        for i, p in enumerate(pages):
            for c in ck.chunk(str(p["body"]), reserved_tokens=reserved[i]).chunks:
                texts.append(TEMPLATE.format(title=p["title"], chunk=c.text))
                owner.append(i)
        cv = vectors(texts)
        label = f"chunks: {splitter}, {ck.chunk_tokens} tokens, overlap {overlap}"
        label += " (default)" if opts == ChunkOptions() else ""
        print(f"  {label:54s} {len(texts):6d} vectors  ", end="")
        print(score(qv @ cv.T, np.array(owner), targets, len(pages)))
    print(
        f"  (embedded {vectors.embedded} texts not in the cache in "
        f"{time.perf_counter() - start:.0f} s)"
    )


# (c) ------------------------------------------------------------------------------------


def edited(body: str) -> str:
    at = body.find(". ", len(body) // 2) + 2
    return body[:at] + EDIT + body[at:]


def edits(pages: list[dict[str, str | int]]) -> None:
    long = [str(p["body"]) for p in pages if len(str(p["body"])) >= 20_000]
    print(
        f"\n(c) one-sentence edit in the middle of each of the {len(long)} pages of 20,000 "
        "characters or more: chunks whose hash is new"
    )
    for name, make in (("all-minilm-l6-v2", minilm_chunker), ("gte-small", gte_chunker)):
        variants: list[tuple[Splitter, int]] = [
            ("markdown", 0),
            ("markdown", 32),
            ("paragraph", 0),
            ("sentence", 0),
            ("word", 0),
        ]
        for splitter, overlap in variants:
            ck = make(ChunkOptions(chunk_overlap=overlap, splitter=splitter))
            new = total = 0
            for body in long:
                before = {c.hash for c in ck.chunk(body).chunks}
                after = ck.chunk(edited(body)).chunks
                new += sum(c.hash not in before for c in after)
                total += len(after)
            print(
                f"  {name:17s} {splitter:9s} {ck.chunk_tokens}/{ck.chunk_overlap}: "
                f"{new} of {total} chunks ({new / total:.1%}), {new / len(long):.2f} a page"
            )


def minilm_chunker(options: ChunkOptions | None = None) -> Chunker:
    return Chunker.for_model(resolve("all-minilm-l6-v2"), options)


# (d) ------------------------------------------------------------------------------------


def big_text(kind: str, pages_path: Path, size: int = 10_000_000) -> str:
    if kind == "docs":
        bodies = [str(p["body"]) for p in load_pages(pages_path)]
        text = "\n\n".join(bodies)
        return (text * (size // len(text) + 1))[:size]
    if kind == "cjk":
        return ("数据库管理员可以使用这个功能来备份和恢复数据。" * (size // 23 + 1))[:size]
    rng = random.Random(0)  # token soup: words joined by punctuation, no whitespace
    words = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 9))) for _ in range(999)]
    return "".join(rng.choice(words) + rng.choice(".,-/:;=_") for _ in range(size // 5))[:size]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def one_big(kind: str, pages_path: Path) -> None:
    """In a fresh process: chunk a 10 MB text; peak RSS while chunking, from Linux's VmHWM
    reset after the text is built."""
    text = big_text(kind, pages_path)
    ck = gte_chunker()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    result = ck.chunk(text)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    print(
        f"  {kind:5s} {len(text) / 1e6:.0f} MB: {seconds:5.1f} s, {len(result.chunks)} chunks "
        f"kept, {result.dropped} dropped (max_chunks {ck.max_chunks}); RSS {before / 1024:.0f} "
        f"MiB before, peak {peak / 1024:.0f} MiB while chunking (+{(peak - before) / 1024:.1f})"
    )


def big(pages_path: Path) -> None:
    print("\n(d) a 10 MB text, gte-small's tokenizer, defaults (each in a fresh process)")
    for kind in ("docs", "cjk", "soup"):
        out = subprocess.run(
            [sys.executable, __file__, "--one-big", kind, "--pages", str(pages_path)],
            check=True,
            capture_output=True,
            text=True,
        )
        print(out.stdout, end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=PAGES)
    parser.add_argument("--skip-retrieval", action="store_true", help="no embedding (fast)")
    parser.add_argument("--one-big", choices=("docs", "cjk", "soup"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_big:
        one_big(args.one_big, args.pages)
        return
    pages = load_pages(args.pages)
    questions = [json.loads(x) for x in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    minilm = minilm_chunker()
    print(f"{cores()} cores; {args.pages.name}; autoembed.chunking defaults: {ChunkOptions()}")
    throughput(pages, minilm)
    if not args.skip_retrieval:
        retrieval(pages, questions)
    edits(pages)
    big(args.pages)


if __name__ == "__main__":
    main()
