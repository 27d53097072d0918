"""The ``autoembed`` command: parse, call, print, exit.

Exit codes: 0 success; 1 unexpected error; 2 bad usage or configuration; 3 model problem;
4 database problem; 5 LLM server problem; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TextIO

from . import __version__
from .config import Settings
from .errors import AutoembedError, ConfigError
from .logs import setup_logging

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

EPILOG = """\
quick start:
  autoembed demo                                   # everything, on a throwaway database
  export DATABASE_URL=postgresql://user:pass@host/db
  autoembed migrate                                # create the autoembed schema
  autoembed watch documents --column content       # vectors for documents.content
  autoembed run                                    # the daemon: new and changed rows, at once
  autoembed search documents "build an index without blocking writes"
  autoembed status

settings come from the environment (DATABASE_URL, AUTOEMBED_MODEL, AUTOEMBED_DEVICE,
AUTOEMBED_BATCH_SIZE, ...); options override them. See README.md for all of them.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", metavar="URL", help="PostgreSQL URL (default: $DATABASE_URL)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per log line (for log collectors)",
    )


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="registry name or model directory (default: $AUTOEMBED_MODEL, else gte-small)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="default: auto (CUDA if present)"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16"],
        help="fp32 (default); int8: faster on CPU, cosine ~0.99 to fp32; fp16: CUDA only",
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="inference threads (default: all cores)"
    )


def _llm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm-model", required=True, metavar="NAME", help="e.g. mistral")
    p.add_argument(
        "--llm-mode",
        choices=["ollama", "openai"],
        help="ollama: Ollama's API (default); openai: /v1/chat/completions "
        "(llamafile, llama.cpp server, vLLM)",
    )
    p.add_argument(
        "--llm-host",
        metavar="URL",
        help="default: $OLLAMA_HOST, $AI_INFERENCE_API_HOST, http://127.0.0.1:11434",
    )
    p.add_argument("--max-tokens", type=int, help="default 100")
    p.add_argument("--temperature", type=float, help="default 0.8")
    p.add_argument("--top-k", type=int, help="default 40")
    p.add_argument("--top-p", type=float, help="default 0.9")
    p.add_argument("--repeat-penalty", type=float, help="default 1.1")
    p.add_argument(
        "--repeat-last-n",
        type=int,
        dest="repeat_penalty_last_n_token_count",
        metavar="N",
        help="tokens the repeat penalty looks back on (default 64; -1: the whole context). "
        "openai mode: llama.cpp's llama-server and llamafile honour it, llama-cpp-python "
        "does not (its --last_n_tokens_size)",
    )
    p.add_argument("--timeout", type=float, help="seconds for the whole answer (default 60)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoembed",
        description="Keep pgvector embeddings in step with text in PostgreSQL, computed "
        "in-process with ONNX Runtime (gte-small by default).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autoembed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, handler: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        p.set_defaults(handler=handler)
        return p

    add(
        "migrate",
        "create or upgrade the autoembed schema (idempotent, safe to run concurrently)",
        "cmd_migrate",
    )

    p = add("watch", "keep a table's vectors in step with one of its text columns", "cmd_watch")
    p.add_argument("table", help="table name, optionally schema-qualified")
    p.add_argument("--column", required=True, help="the text column to embed")
    p.add_argument(
        "--embedding-column",
        default="embedding",
        help="vector column, added if missing (default: embedding)",
    )
    p.add_argument("--model", metavar="NAME|PATH", help="default: $AUTOEMBED_MODEL, else gte-small")
    p.add_argument("--match-function", metavar="NAME", help="default: match_<table>")
    p.add_argument("--summary-column", metavar="COL", help="also write an LLM summary here")
    p.add_argument("--llm-model", metavar="NAME", help="LLM for summaries, e.g. mistral")
    p.add_argument(
        "--prompt",
        metavar="TEMPLATE",
        help="summary prompt; {column} placeholders take the row's values",
    )
    p.add_argument(
        "--llm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="generation option (max_tokens, temperature, top_k, top_p, "
        "repeat_penalty, repeat_penalty_last_n_token_count, timeout); repeatable",
    )
    p.add_argument(
        "--template",
        metavar="TEMPLATE",
        help='the text to embed from several columns, e.g. "{title}: {body}"; with --chunk, '
        '{chunk} places each passage, e.g. "{title}\\n\\n{chunk}"',
    )
    p.add_argument(
        "--chunk",
        action="store_true",
        help="cut long texts into passages that fit the model, each with its vector, in a "
        "table next to this one (<table>_chunks)",
    )
    p.add_argument("--chunk-tokens", type=int, metavar="N", help="passage size in model tokens")
    p.add_argument("--chunk-overlap", type=int, metavar="N", help="tokens shared by neighbours")
    p.add_argument(
        "--splitter",
        choices=["markdown", "paragraph", "sentence", "word"],
        help="the strongest boundary passages end at (default: markdown headings)",
    )
    p.add_argument("--max-chunks", type=int, metavar="N", help="passages per row at most")
    p.add_argument("--chunk-table", metavar="NAME", help="default: <table>_chunks")
    p.add_argument(
        "--metadata-column",
        metavar="COL",
        help="a jsonb column the search functions filter on (metadata @> filter)",
    )
    p.add_argument(
        "--language", default="english", help="text search configuration for hybrid search"
    )
    p.add_argument(
        "--storage",
        choices=["vector", "halfvec"],
        default="vector",
        help="halfvec: half the size, for table and index",
    )
    p.add_argument(
        "--index",
        choices=["auto", "now", "deferred"],
        default="auto",
        help="auto: a backfill of more than 10,000 rows is embedded first and indexed once "
        "(by the worker, CONCURRENTLY); now: index at once; deferred: always after",
    )

    p = add(
        "unwatch", "stop watching a table (keeps the vectors unless --drop-column)", "cmd_unwatch"
    )
    p.add_argument("table")
    p.add_argument("--embedding-column", default="embedding")
    p.add_argument("--drop-column", action="store_true", help="also drop the vector column")

    p = add("run", "the daemon: embed new and changed rows as they arrive", "cmd_run")
    _engine_options(p)
    p.add_argument(
        "--drain",
        action="store_true",
        help="process until the queue is empty, then exit 0 (backfills)",
    )
    p.add_argument(
        "--concurrency", type=int, metavar="N", help="batches in flight in this process (default 2)"
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="rows per claim (default 512)")
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the HTTP API (webhooks, /embed, /v1/embeddings, /metrics)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar with --drain")

    p = add("status", "pending, running and failed jobs per watch", "cmd_status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--failed",
        type=int,
        default=10,
        metavar="N",
        help="list the N most recent failed jobs with their errors (default 10)",
    )

    p = add("retry", "queue failed jobs again", "cmd_retry")
    p.add_argument("table", nargs="?", help="only this table's (default: all)")

    p = add("search", "nearest rows to a text, through the table's match function", "cmd_search")
    p.add_argument("table")
    p.add_argument("text")
    p.add_argument("--limit", type=int, default=5)
    p.add_argument(
        "--threshold", type=float, default=-1.0, help="minimum cosine similarity (default: none)"
    )
    p.add_argument(
        "--hybrid",
        action="store_true",
        help="full text and vectors, fused by reciprocal rank (finds exact names and codes)",
    )
    p.add_argument(
        "--filter",
        metavar="JSON",
        help="metadata filter, e.g. '{\"tenant\": 7}' (metadata @> filter)",
    )
    p.add_argument("--embedding-column", help="when the table has several watches")
    p.add_argument(
        "--json", action="store_true", help="one object per row: id, similarity (score), metadata"
    )
    _engine_options(p)

    p = add("embed", "print the embedding of each text, one JSON array per line", "cmd_embed")
    p.add_argument(
        "texts",
        nargs="*",
        metavar="TEXT",
        help="texts to embed; none: read standard input, one text per line",
    )
    p.add_argument(
        "--jsonl",
        action="store_true",
        help="standard input holds one JSON string per line (texts may hold newlines)",
    )
    p.add_argument(
        "--no-mean-pool",
        action="store_true",
        help="take the first token's state instead of the mean (Session.run's mean_pool)",
    )
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    p.add_argument(
        "--table",
        metavar="TABLE",
        help="embed with the model of TABLE's watch (a query vector for its search function)",
    )
    _engine_options(p)

    add("models", "the model registry, and what is cached or installed here", "cmd_models")

    p = add(
        "serve",
        "the HTTP API alone: webhooks, /embed, /v1/embeddings, health, metrics",
        "cmd_serve",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8080; a non-loopback address "
        "needs AUTOEMBED_API_KEY)",
    )
    _engine_options(p)

    p = add(
        "generate",
        "generate text with the LLM server (Ollama or OpenAI-compatible)",
        "cmd_generate",
    )
    p.add_argument("prompt", help="the prompt; - reads it from standard input")
    _llm_options(p)
    p.add_argument("--stream", action="store_true", help="print the text as it arrives")

    p = add("demo", "the whole thing on a throwaway embedded PostgreSQL, no set-up", "cmd_demo")
    p.add_argument(
        "--rows",
        type=int,
        default=1000,
        help="PostgreSQL documentation passages to load (default 1000; 0: all 5,933)",
    )
    _engine_options(p)
    return parser


# ---------------------------------------------------------------------------- helpers


async def _connect(settings: Settings) -> Any:
    from .db import connect

    return await connect(settings.require_database())


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], out: TextIO) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)), file=out)


def format_vector(vector: Any) -> str:
    # str() of a float32 is its shortest exact form: no float64 noise digits
    return "[" + ", ".join(str(x) for x in vector) + "]"


def _load_embedder(args: argparse.Namespace, settings: Settings, model: str | None = None) -> Any:
    from .engine import Embedder

    return Embedder.load(
        model or args.model or settings.model,
        device=args.device or settings.device,
        precision=args.precision or settings.precision,
        threads=args.threads or settings.threads,
    )


def _read_texts(stream: TextIO, jsonl: bool) -> Iterator[str]:
    for n, line in enumerate(stream, start=1):
        if jsonl:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"stdin line {n}: not JSON ({exc})") from None
            if not isinstance(value, str):
                raise ConfigError(
                    f"stdin line {n}: expected a JSON string, got {type(value).__name__}"
                )
            yield value
        else:
            yield line.rstrip("\r\n")


# ---------------------------------------------------------------------------- commands


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from .migrate import migrate

    report = await migrate(settings.require_database())
    if report.applied:
        print(f"applied {len(report.applied)} migration(s): {', '.join(report.applied)}")
    else:
        print(f"schema up to date ({len(report.already)} migration(s) applied earlier)")
    print(f"re-applied {len(report.repeatable)} definition file(s) from sql/")
    if report.refreshed:
        print(f"re-made the functions of {len(report.refreshed)} watch(es)")
    for line in report.not_refreshed:
        print(f"not refreshed: {line}", file=sys.stderr)
    return 0


def _watch_llm_options(pairs: Sequence[str]) -> dict[str, Any]:
    from .llm import GenerateOptions

    raw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--llm-option {pair!r}: expected KEY=VALUE")
        try:
            raw[key.strip()] = json.loads(value)
        except ValueError:
            raw[key.strip()] = value
    return GenerateOptions.from_mapping(raw).to_dict() if raw else {}


async def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from . import watches

    if args.summary_column and not args.llm_model:
        raise ConfigError("--summary-column needs --llm-model (e.g. --llm-model mistral)")
    options = _watch_llm_options(args.llm_option)
    chunk_options = {
        "chunk_tokens": args.chunk_tokens,
        "chunk_overlap": args.chunk_overlap,
        "splitter": args.splitter,
        "max_chunks": args.max_chunks,
        "table": args.chunk_table,
    }
    chunking: dict[str, Any] | None = {k: v for k, v in chunk_options.items() if v is not None}
    if not args.chunk:
        if chunking:
            raise ConfigError(
                "--chunk-tokens, --chunk-overlap, --splitter, --max-chunks and "
                "--chunk-table go with --chunk"
            )
        chunking = None
    async with await _connect(settings) as conn:
        info = await watches.watch(
            conn,
            args.table,
            args.column,
            embedding_column=args.embedding_column,
            model=args.model,
            default_model=settings.model,
            match_function=args.match_function,
            summary_column=args.summary_column,
            llm_model=args.llm_model,
            llm_prompt=args.prompt,
            llm_options=options,
            template=args.template,
            index=args.index,
            metadata_column=args.metadata_column,
            language=args.language,
            storage=args.storage,
            chunking=chunking,
        )
    target = info["chunk_table"] or args.embedding_column
    print(
        f"watching {info['source']}.{args.column} -> {target} "
        f"(model {info['model']}, {args.storage}({info['dim']}))"
        + (f"; changing to {info['next_model']}" if info["next_model"] else "")
    )
    print(f"search function: {info['match_function']}")
    print(f"{info['queued']} job(s) queued; `autoembed run` embeds them")
    return 0


async def cmd_unwatch(args: argparse.Namespace, settings: Settings) -> int:
    from . import watches

    async with await _connect(settings) as conn:
        removed = await watches.unwatch(conn, args.table, args.embedding_column, args.drop_column)
    if not removed:
        print(f"{args.table}.{args.embedding_column} was not watched", file=sys.stderr)
        return 1
    print(
        f"stopped watching {args.table}.{args.embedding_column}"
        + (" and dropped the column" if args.drop_column else "")
    )
    return 0


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from .runner import Worker

    settings = settings.with_(
        model=args.model,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        http=args.http,
    )
    worker = Worker(settings, drain=args.drain, progress=False if args.no_progress else None)
    if settings.http:
        from .http import serve_with_worker

        return await serve_with_worker(worker, settings)
    return await worker.run()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from . import watches

    async with await _connect(settings) as conn:
        rows = await watches.status(conn)
        failed = await watches.failed_jobs(conn, args.failed) if args.failed else []
        workers = await watches.workers(conn)
    if args.json:
        doc = {"watches": rows, "failed": failed, "workers": workers}
        print(json.dumps(doc, default=str, indent=2))
        return 0
    if not rows:
        print("nothing is watched yet: autoembed watch TABLE --column COLUMN")
        return 0
    for r in rows:
        r["id"] = r["watch_id"]
        r["table"] = r["source"]
        r["column"] = r["target_column"]
        r["fresh"] = f"{r['fresh_pending']} ({_age(r['oldest_fresh_seconds'])})"
        r["backfill"] = f"{r['backfill_pending']} ({_age(r['oldest_backfill_seconds'])})"
        r["rows/s (1 min)"] = f"{(r['rows_last_minute'] or 0) / 60:.1f}"
    columns = ["id", "table", "column", "lane", "model", "fresh", "backfill", "running", "failed"]
    _print_table(rows, [*columns, "rows/s (1 min)", "index"], sys.stdout)
    print(
        "\n(fresh: rows the application wrote, served first; backfill: rows queued by "
        "watch, a model change or retry; in brackets the age of the oldest)"
    )
    problems = {(r["watch_id"], r["problem"]) for r in rows if r["problem"]}
    notes = {(r["watch_id"], r["index_note"]) for r in rows if r["index_note"]}
    if problems:
        print("\nnot served:")
        for wid, problem in sorted(problems):
            print(f"  watch {wid}: {problem}")
    for wid, note in sorted(notes):
        print(f"\nwatch {wid}: {note}")
    if workers:
        print(f"\nworkers ({len(workers)} seen in the last 5 minutes):")
        for w in workers:
            trouble = "; ".join(f"{k}: {v}" for k, v in (w["problems"] or {}).items())
            print(
                f"  {w['name']} (seen {_age(w['seen_seconds_ago'])} ago)"
                + (f": {trouble}" if trouble else "")
            )
    else:
        print("\nno worker has been seen in the last 5 minutes: start one with `autoembed run`")
    if failed:
        print(f"\nfailed jobs (most recent {len(failed)}; `autoembed retry` queues them again):")
        for f in failed:
            print(
                f"  {f['source']} {f['lane']} row {f['pk']} after {f['attempts']} attempt(s): "
                f"{(f['last_error'] or '').splitlines()[0][:200]}"
            )
    return 0


async def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    from . import watches

    async with await _connect(settings) as conn:
        n = await watches.retry(conn, args.table)
    print(f"queued {n} failed job(s) again")
    return 0


async def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from . import watches

    meta = watches.parse_filter(args.filter)
    async with await _connect(settings) as conn:
        found = await watches.find_watch(conn, args.table, args.embedding_column)
        emb = await asyncio.to_thread(_load_embedder, args, settings, found["model"])
        vector = (await asyncio.to_thread(emb.embed, [args.text]))[0]
        rows = await watches.search(
            conn,
            found,
            vector,
            args.threshold,
            args.limit,
            text=args.text,
            hybrid=args.hybrid,
            filter=meta,
        )
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
        return 0
    if not rows:
        print("no rows found (are the vectors written yet? see `autoembed status`)")
    for r in rows:
        snippet = " ".join(str(r["content"]).split())[:110]
        score = f"{r['score']:.4f} " if "score" in r else ""
        print(f"{score}{r['similarity']:.3f}  {r['id']}  {snippet}")
    return 0


async def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    model = None
    if args.table:
        from . import watches

        if args.model:
            raise ConfigError("--table uses the model of the table's watch: leave out --model")
        async with await _connect(settings) as conn:
            model = (await watches.find_watch(conn, args.table))["model"]
    emb = await asyncio.to_thread(_load_embedder, args, settings, model)
    opts = {"mean_pool": not args.no_mean_pool, "normalize": not args.no_normalize}

    def emit(texts: list[str]) -> None:
        for vector in emb.embed(texts, **opts):
            sys.stdout.write(format_vector(vector) + "\n")
        sys.stdout.flush()

    if args.texts:
        await asyncio.to_thread(emit, list(args.texts))
        return 0
    if sys.stdin.isatty():
        print("reading texts from standard input, one per line (Ctrl-D to end)", file=sys.stderr)
    chunk: list[str] = []
    for text in _read_texts(sys.stdin, args.jsonl):
        chunk.append(text)
        if len(chunk) == 256:  # bounded memory, output in input order
            await asyncio.to_thread(emit, chunk)
            chunk = []
    if chunk:
        await asyncio.to_thread(emit, chunk)
    return 0


async def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from .engine.registry import DEFAULT_MODEL, REGISTRY
    from .engine.resolve import availability, cache_root

    rows = [
        {
            "name": spec.name + (" (default)" if spec.name == DEFAULT_MODEL else ""),
            "dim": spec.dim,
            "pooling": spec.pooling,
            "max tokens": spec.max_tokens,
            "here": availability(spec),
        }
        for spec in REGISTRY.values()
    ]
    _print_table(rows, ["name", "dim", "pooling", "max tokens", "here"], sys.stdout)
    print(f"\ncache: {cache_root()} (AUTOEMBED_CACHE_DIR)")
    return 0


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .http import serve

    settings = settings.with_(
        model=args.model,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        http=args.listen,
    )
    return await serve(settings)


async def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from .llm import GenerateOptions, LLMClient

    names = ["max_tokens", "temperature", "top_k", "top_p", "repeat_penalty"]
    names += ["repeat_penalty_last_n_token_count", "timeout"]
    given = {name: getattr(args, name) for name in names}
    options = GenerateOptions.from_mapping({k: v for k, v in given.items() if v is not None})
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    mode = args.llm_mode or settings.llm_mode
    host = args.llm_host or settings.llm_host
    async with LLMClient(host, mode, retries=settings.llm_retries) as client:
        # Some servers answer with whatever model they loaded, whatever is asked for.
        await client.require_model(args.llm_model)
        if not args.stream:
            print(await client.generate(args.llm_model, prompt, options))
            return 0
        wrote = False
        try:
            async for piece in client.stream(args.llm_model, prompt, options):
                sys.stdout.write(piece)
                sys.stdout.flush()
                wrote = True
        except BaseException:
            if wrote:  # end the partial line before the error message
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
        sys.stdout.write("\n")
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return await run_demo(args, settings)


# ---------------------------------------------------------------------------- entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, secrets=[args.database_url or ""])
    try:
        settings = Settings.from_env(database_url=args.database_url)
        handler: Handler = globals()[args.handler]
        return asyncio.run(handler(args, settings))
    except AutoembedError as exc:
        print(f"autoembed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
