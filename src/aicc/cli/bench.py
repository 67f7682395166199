"""`aicc bench`: load-test any OpenAI-compatible server (aicc or a peer) and report latency
and throughput, in the manner of vLLM's `bench serve`."""

from __future__ import annotations

import asyncio
import math
import ssl
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from aicc.cli.client import DEFAULT_SERVER, ApiClient, CliError, Connection, TokenSource
from aicc.cli.credentials import CredentialStore, normalize_server

if TYPE_CHECKING:
    from aicc.loadgen.datasets import Prompt
    from aicc.loadgen.runner import Target

T = TypeVar("T")

DEFAULT_RANDOM_PROMPTS = 100


@click.command()
@click.option(
    "--base-url",
    "--server",
    "base_url",
    envvar="AICC_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    show_envvar=True,
    metavar="URL",
    help="Server root (a trailing /v1 is accepted).",
)
@click.option("--api-key", envvar="AICC_API_KEY", show_envvar=True, metavar="KEY", help="API key.")
@click.option(
    "--cacert",
    envvar="AICC_CACERT",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate (PEM) that signed the server's.",
)
@click.option("--model", help="Model to request.  [default: the first of GET /v1/models]")
@click.option(
    "--endpoint", type=click.Choice(["chat", "completions"]), default="chat", show_default=True
)
@click.option(
    "--dataset",
    default="random",
    show_default=True,
    metavar="random|PATH",
    help='Random prompts, or a JSONL file of {"prompt": ...} / {"messages": [...]} lines.',
)
@click.option(
    "--num-prompts",
    type=click.IntRange(min=1),
    help=f"Requests per level.  [default: {DEFAULT_RANDOM_PROMPTS}; a file: all its lines]",
)
@click.option(
    "--input-len",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Random prompts: words per prompt (about one token each).",
)
@click.option(
    "--output-len",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="max_tokens of each request (a file line's own max_tokens wins).",
)
@click.option(
    "--ignore-eos", is_flag=True, help="Ask the server to generate all --output-len tokens."
)
@click.option(
    "--concurrency",
    metavar="N[,N...]",
    help="Most requests in flight; a list sweeps the levels.  [default: no limit]",
)
@click.option(
    "--request-rate",
    type=float,
    default=math.inf,
    help="Poisson arrivals per second.  [default: inf, all at once]",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Requests sent first and left out of the results.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random prompts and arrivals.")
@click.option(
    "--goodput",
    multiple=True,
    metavar="NAME:MS",
    help="SLOs for goodput, e.g. 'ttft:500 tpot:50 e2e:2000' (ms).",
)
@click.option(
    "--percentiles",
    default="99",
    show_default=True,
    metavar="P[,P...]",
    help="Latency percentiles to report beside mean and median.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw a PNG chart here.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds one request may take.",
)
def bench(**options: Any) -> None:
    """Load-test an OpenAI-compatible server: latency (TTFT, TPOT, ITL, E2E) and throughput."""
    # The load generator (and numpy under it) is imported only when a benchmark runs.
    from aicc.loadgen.stats import parse_percentiles, parse_slo

    try:
        percentiles = parse_percentiles(options["percentiles"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--percentiles") from exc
    try:
        slo = parse_slo(options["goodput"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--goodput") from exc
    if not options["request_rate"] > 0:
        raise click.BadParameter("must be positive (or inf)", param_hint="--request-rate")
    options.update(
        base_url=_base_url(options["base_url"]),
        levels=_levels(options["concurrency"]),
        percentiles=percentiles,
        slo=slo,
    )
    _run(options)


def _base_url(url: str) -> str:
    try:
        normalized = normalize_server(url)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="--base-url") from exc
    return normalized.removesuffix("/v1")


def _levels(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    levels: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise click.BadParameter(
                f"{item!r} is not a positive whole number; use e.g. 1,4,16,32",
                param_hint="--concurrency",
            )
        levels.append(int(item))
    return levels


def _run(options: dict[str, Any]) -> None:
    from aicc.loadgen.datasets import DatasetError
    from aicc.loadgen.report import BenchConfig, format_table, to_json, write_json, write_plot
    from aicc.loadgen.runner import Load, ProgressLine, Target, run_load
    from aicc.loadgen.stats import summarize

    try:
        prompts = _prompts(options)
    except DatasetError as exc:
        raise CliError(str(exc)) from exc
    if options["endpoint"] == "completions" and any(p.messages for p in prompts):
        raise CliError("the dataset holds chat messages; use --endpoint chat")
    conn = Connection(server=options["base_url"], cacert=options["cacert"])
    token, source = _credential(conn.server, options["api_key"])
    with ApiClient(conn, token=token, source=source) as api:
        # Listing the models first checks the address, TLS and key before any load is sent.
        served = _served_models(api)
    model: str | None = options["model"] or next(iter(served), None)
    if model is None:
        raise CliError(f"the server at {conn.server} lists no models; pass --model")
    target = Target(
        base_url=conn.server,
        model=model,
        endpoint=options["endpoint"],
        api_key=token,
        verify=_verify(conn),
        timeout_s=options["timeout"],
        output_len=options["output_len"],
        ignore_eos=options["ignore_eos"],
    )
    levels: list[int | None] = options["levels"]
    if options["warmup"]:
        _warm_up(target, prompts[: options["warmup"]], levels)
    base_load = Load(request_rate=options["request_rate"], seed=options["seed"])
    runs, summaries = [], []
    for concurrency in levels:
        load = replace(base_load, concurrency=concurrency)
        label = f"c={concurrency}" if concurrency is not None else "c=inf"
        run = asyncio.run(run_load(target, prompts, load, ProgressLine(sys.stderr, label)))
        runs.append(run)
        summaries.append(summarize(run, percentiles=options["percentiles"], slo=options["slo"]))
    click.echo(format_table(summaries, options["percentiles"]))
    config = BenchConfig(
        base_url=conn.server,
        model=model,
        endpoint=options["endpoint"],
        dataset=options["dataset"],
        num_prompts=len(prompts),
        input_len=options["input_len"] if options["dataset"] == "random" else None,
        output_len=options["output_len"],
        request_rate=options["request_rate"],
        warmup=options["warmup"],
        seed=options["seed"],
        ignore_eos=options["ignore_eos"],
        percentiles=options["percentiles"],
        slo=options["slo"],
    )
    if options["json_path"] is not None:
        path = options["json_path"]
        _write(path, lambda: write_json(path, to_json(config, summaries, runs)))
    if options["plot_path"] is not None:
        path = options["plot_path"]
        note = _write(path, lambda: write_plot(path, summaries, options["percentiles"]))
        if note is not None:
            click.echo(f"aicc: {note}", err=True)
    if all(s.num_successful == 0 for s in summaries):
        raise CliError(f"every request failed; the first: {runs[0].requests[0].error}")


def _warm_up(target: Target, prompts: list[Prompt], levels: list[int | None]) -> None:
    """Send `prompts` (at most as many at once as the highest level); they are not measured.

    Raises:
        CliError: every warm-up request failed (wrong model, no permission, ...).
    """
    from aicc.loadgen.runner import Load, run_load

    limit = max((c for c in levels if c is not None), default=len(prompts))
    warm = asyncio.run(run_load(target, prompts, Load(min(limit, len(prompts)))))
    if not any(r.is_ok for r in warm.requests):
        raise CliError(f"the warm-up request failed: {warm.requests[0].error}")


def _write(path: Path, write: Callable[[], T]) -> T:
    try:
        return write()
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _credential(server: str, api_key: str | None) -> tuple[str | None, TokenSource]:
    """`--api-key`, else the session `aicc login` stored for this server, else none."""
    if api_key and api_key.strip():
        return api_key.strip(), "api_key"
    stored = CredentialStore().get(server)
    if stored is not None:
        return stored.token, "session"
    return None, "none"


def _served_models(api: ApiClient) -> list[str]:
    """The model ids GET /v1/models lists.

    Raises:
        CliError: no server, TLS trouble, or a refused key (ApiError, with advice).
    """
    listing = api.get("/v1/models")
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return []
    return [str(e["id"]) for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)]


def _verify(conn: Connection) -> ssl.SSLContext | bool:
    if conn.cacert is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(conn.cacert))
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the CA certificate {conn.cacert}: {exc}") from exc


def _prompts(options: dict[str, Any]) -> list[Prompt]:
    from aicc.loadgen.datasets import load_jsonl, random_prompts, take

    num_prompts: int | None = options["num_prompts"]
    if options["dataset"] == "random":
        count = num_prompts or DEFAULT_RANDOM_PROMPTS
        return random_prompts(count, options["input_len"], options["seed"])
    return take(load_jsonl(Path(options["dataset"])), num_prompts)
