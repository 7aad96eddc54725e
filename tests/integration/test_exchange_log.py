"""The exchange log through a real gateway, on a SQLite file and on PostgreSQL.

One record per upstream call, written after its stream ends, whatever the
number of requests that shared it; the stream's outcome; the list API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import socket
import threading
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.exchanges.postgres import PostgresStore
from gateway.exchanges.sqlite import SqliteStore
from gateway.exchanges.store import StoreUnavailable
from gateway.state import STATE
from tests.integration.conftest import until
from tests.integration.exchange_fixtures import chat, stream_text, written
from tests.integration.faulty_upstream import faulty_upstream
from tests.integration.metrics_scrape import scrape
from tests.integration.sse_frames import FrameReader
from tests.loopback import serving
from tests.unit.test_exchange_writer import exchange

ROOT = Path(__file__).resolve().parents[2]


def files_bytes(directory: Path) -> bytes:
    """Every byte of every file in ``directory`` (a database, its WAL, its -shm)."""
    return b"".join(path.read_bytes() for path in sorted(directory.iterdir()))


async def test_a_burst_of_50_is_one_exchange_of_2_messages_and_50_subscribers(
    gateway_factory, store_url
):
    """The product's burst test: 50 identical requests, one upstream call,
    one exchange with the user's message and the answer, 50 request ids."""
    gateway = await gateway_factory(exchange_log_url=store_url)
    writer = gateway.state.exchanges.writer
    prompt = "burst of fifty [sim ttft_ms=50 tokens=8]"
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(stream_text(http, gateway.url, chat(prompt)) for _ in range(50))
        )
        ended = asyncio.get_running_loop().time()
        await written(writer, 1)
        # Durable within a second of the stream's end (a ceiling: at rest it is a tick).
        assert asyncio.get_running_loop().time() - ended < 1.0
        async with http.get(gateway.v1 + "/exchanges") as resp:
            assert resp.status == 200
            listing = await resp.json()
    texts = {text for _, text in results}
    assert len(texts) == 1
    (answer,) = texts
    assert gateway.state.registry.statistics().upstream_calls_total == 1
    assert listing["object"] == "list"
    (exchange,) = listing["data"]
    assert exchange["subscribers"] == 50
    assert sorted(exchange["request_ids"]) == sorted(request_id for request_id, _ in results)
    assert exchange["outcome"] == "complete"
    assert exchange["finish_reason"] == "stop"
    assert exchange["model"] == "sim"
    assert exchange["usage"]["completion_tokens"] == 8
    assert exchange["ttft_ms"] > 0 and exchange["duration_ms"] >= exchange["ttft_ms"]
    # Content off (the default): roles, lengths and hashes, never the text.
    assert exchange["messages"] == [
        {"role": "user", "content": None, "length": len(prompt),
         "sha256": hashlib.sha256(prompt.encode()).hexdigest()},
        {"role": "assistant", "content": None, "length": len(answer),
         "sha256": hashlib.sha256(answer.encode()).hexdigest()},
    ]
    assert writer.written_total == 1 and writer.dropped_total == 0


async def test_content_is_stored_only_when_asked(gateway_factory, store_url):
    gateway = await gateway_factory(exchange_log_url=store_url, exchange_log_content=True)
    prompt = "keep my words [sim tokens=5]"
    async with aiohttp.ClientSession() as http:
        _, answer = await stream_text(http, gateway.url, chat(prompt))
        await written(gateway.state.exchanges.writer, 1)
        async with http.get(gateway.v1 + "/exchanges") as resp:
            (exchange,) = (await resp.json())["data"]
    assert exchange["messages"] == [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]


async def test_a_cancelled_and_a_failed_stream_are_recorded_with_their_outcome(
    gateway_factory, store_url
):
    gateway = await gateway_factory(exchange_log_url=store_url)
    writer = gateway.state.exchanges.writer
    async with aiohttp.ClientSession() as http:
        # Cancelled: the only client leaves after its first token.
        async with http.post(
            gateway.v1 + "/chat/completions",
            json=chat("leave early [sim ttft_ms=0 itl_ms=50 tokens=1000]"),
        ) as resp:
            reader = FrameReader(resp)
            while (frame := await reader.next()) is not None and not (
                frame.data and frame.json().get("choices")
            ):
                pass
            cancelled_id = resp.headers["X-Request-Id"]
            resp.close()
        await written(writer, 1)
        # Failed: the upstream resets the stream after 3 tokens.
        async with http.post(
            gateway.v1 + "/chat/completions", json=chat("fail midway [sim reset_after=3]")
        ) as resp:
            frames = await FrameReader(resp).rest()
            failed_id = resp.headers["X-Request-Id"]
        assert "error" in frames[-1].json()
        await written(writer, 2)
        async with http.get(gateway.v1 + "/exchanges") as resp:
            failed, cancelled = (await resp.json())["data"]
    assert cancelled["request_ids"] == [cancelled_id]
    assert cancelled["outcome"] == "cancelled"
    assert cancelled["finish_reason"] == "cancelled"
    assert cancelled["error"] is None
    assert failed["request_ids"] == [failed_id]
    assert failed["outcome"] == "failed"
    assert failed["finish_reason"] is None
    assert failed["error"]["code"] == "upstream_stream_reset"
    # What came before the failure is counted: three tokens' worth of text.
    assert failed["messages"][1]["length"] > 0


async def test_without_content_no_message_text_reaches_the_sqlite_file(gateway_factory, tmp_path):
    """Every byte of the database (its WAL and shared memory too) is free of
    the prompt and the answer; with content on the same check finds them."""
    secret = "zanzibar-quokka-7731 tell me about the blue heron"
    for keep_content in (False, True):
        directory = tmp_path / str(keep_content)
        gateway = await gateway_factory(
            exchange_log_url=f"sqlite:///{directory}/log.db", exchange_log_content=keep_content
        )
        async with aiohttp.ClientSession() as http:
            _, answer = await stream_text(http, gateway.url, chat(secret + " [sim tokens=40]"))
        await written(gateway.state.exchanges.writer, 1)
        stored = files_bytes(directory)
        assert len(answer) > 100
        needles = [secret.encode(), answer[:40].encode(), answer[-40:].encode()]
        found = [needle in stored for needle in needles]
        assert found == [keep_content] * 3, (keep_content, found)


@pytest.mark.parametrize("keep_content", [False, True], ids=["content-off", "content-on"])
async def test_an_upstream_error_quoting_the_key_and_the_prompt_stays_out_of_the_file(
    tmp_path, keep_content
):
    """An upstream 401 whose plain-text body quotes our upstream key and the
    prompt: the failed call's record never holds the key, and with content
    off it holds no text of the prompt either (only the status, in our words)."""
    key = "sk-upstream-TOPSECRET-0123456789"
    prompt = "key-in-text zanzibar-quokka-7731 tell me about the blue heron"
    directory = tmp_path / "log"
    settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                        upstream_api_key=key, exchange_log_url=f"sqlite:///{directory}/log.db",
                        exchange_log_content=keep_content)
    async with faulty_upstream() as upstream, running_gateway(
        dataclasses.replace(settings, upstream_url=upstream.url)
    ) as (app, url):
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/chat/completions", json=chat(prompt, stream=False)) as resp:
                assert resp.status == 502
                told = (await resp.json())["error"]["message"]
            exchanges = app[STATE].exchanges
            await written(exchanges.writer, 1)
            async with http.get(url + "/v1/exchanges") as resp:
                (exchange,) = (await resp.json())["data"]
    assert upstream.requests == 1
    assert exchange["outcome"] == "failed"
    stored = files_bytes(directory)
    assert key.encode() not in stored
    assert told == "the upstream refused the gateway's credentials"
    assert (b"zanzibar-quokka-7731" in stored) == keep_content
    if keep_content:
        assert "[redacted]" in exchange["error"]["message"]
    else:
        assert exchange["error"]["message"] == "the upstream answered 401"


@pytest.mark.parametrize("keep_content", [False, True], ids=["content-off", "content-on"])
async def test_a_failed_connect_is_recorded_in_our_words_without_the_address(
    tmp_path, keep_content
):
    """An upstream that refuses the connection: the record's error is the
    cause as the client is told it, with content on too (there is no
    upstream text to keep), never the upstream's host and port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                        upstream_url=f"http://127.0.0.1:{port}",
                        exchange_log_url=f"sqlite:///{tmp_path}/log.db",
                        exchange_log_content=keep_content)
    async with running_gateway(settings) as (app, url):
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/chat/completions", json=chat("refused")) as resp:
                frames = await FrameReader(resp).rest()
            told = frames[-1].json()["error"]
            await written(app[STATE].exchanges.writer, 1)
            async with http.get(url + "/v1/exchanges") as resp:
                (exchange,) = (await resp.json())["data"]
    assert exchange["outcome"] == "failed"
    assert exchange["error"] == {"code": "upstream_connect_error",
                                 "message": "the gateway could not connect to the upstream"}
    assert exchange["error"] == {"code": told["code"], "message": told["message"]}
    assert str(port) not in json.dumps(exchange)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@pytest.mark.parametrize("keep_content", [False, True], ids=["content-off", "content-on"])
async def test_an_answer_with_surrogates_streams_whole_and_is_recorded(store_url, keep_content):
    """An upstream answer holding a lone UTF-16 surrogate, and one sending an
    emoji as its two halves in two chunks: each client gets the whole
    answer as with the log off, and each call is one record: its length
    and hash of the text a client reads (the emoji one character); with
    content, the text itself, the lone surrogate stored as U+FFFD."""
    settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                        exchange_log_url=store_url, exchange_log_content=keep_content)
    async with faulty_upstream() as upstream, running_gateway(
        dataclasses.replace(settings, upstream_url=upstream.url)
    ) as (app, url), aiohttp.ClientSession() as http:
        _, lone = await stream_text(http, url, chat("surrogate"))
        _, split = await stream_text(http, url, chat("split-emoji"))
        writer = app[STATE].exchanges.writer
        await written(writer, 2)
        async with http.get(url + "/v1/exchanges") as resp:
            assert resp.status == 200
            emoji, surrogate = (await resp.json())["data"]
    assert (lone, split) == ("hi \ud800 there", "smile \ud83d\ude00")
    assert (writer.written_total, writer.dropped_total, writer.connected) == (2, 0, True)
    if keep_content:
        assert surrogate["messages"][-1] == {"role": "assistant", "content": "hi \ufffd there"}
        assert emoji["messages"][-1] == {"role": "assistant", "content": "smile \U0001f600"}
    else:
        assert surrogate["messages"][-1] == {"role": "assistant", "content": None, "length": 10,
                                             "sha256": _sha256("hi \ud800 there")}
        assert emoji["messages"][-1] == {"role": "assistant", "content": None, "length": 7,
                                         "sha256": _sha256("smile \U0001f600")}


@pytest.mark.parametrize("keep_content", [False, True], ids=["content-off", "content-on"])
async def test_nul_in_a_prompt_or_a_model_is_recorded_as_u_fffd(gateway_factory, store_url,
                                                                 keep_content):
    """NUL is text neither database stores (PostgreSQL refuses it): a call
    whose model or prompt holds one is recorded all the same, NUL as U+FFFD
    (the hash without content is of the text as sent)."""
    gateway = await gateway_factory(exchange_log_url=store_url, exchange_log_content=keep_content)
    writer = gateway.state.exchanges.writer
    prompt = "a NUL \u0000 here [sim tokens=3]"
    async with aiohttp.ClientSession() as http:
        await stream_text(http, gateway.url, chat(prompt))
        await stream_text(http, gateway.url, chat("plain [sim tokens=3]", model="sim\u0000x"))
        await written(writer, 2)
        async with http.get(gateway.v1 + "/exchanges") as resp:
            assert resp.status == 200
            by_model, with_nul = (await resp.json())["data"]
        async with http.get(gateway.v1 + "/exchanges?model=sim%EF%BF%BDx") as resp:
            assert [e["id"] for e in (await resp.json())["data"]] == [by_model["id"]]
    assert (writer.written_total, writer.dropped_total) == (2, 0)
    assert (by_model["model"], with_nul["model"]) == ("sim\ufffdx", "sim")
    if keep_content:
        assert with_nul["messages"][0] == {"role": "user", "content": "a NUL \ufffd here [sim tokens=3]"}
    else:
        assert with_nul["messages"][0] == {"role": "user", "content": None, "length": len(prompt),
                                           "sha256": _sha256(prompt)}


async def test_tool_calls_nested_as_deep_as_a_request_may_are_stored(gateway_factory, store_url):
    """With content on, a request's tool calls are stored as the client sent
    them, however deep its JSON nests (900 levels: the gateway takes the
    request and streams the answer): the record is written, not dropped
    by the writer with its batch."""
    gateway = await gateway_factory(exchange_log_url=store_url, exchange_log_content=True)
    writer = gateway.state.exchanges.writer
    depth = 900
    # Written out by hand: the test's own encoder would recurse as deep.
    tool_call = ('{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"},'
                 ' "x": ' + "[" * depth + "]" * depth + "}")
    body = ('{"model": "sim", "stream": true, "messages": ['
            '{"role": "user", "content": "deep [sim tokens=2]"}, '
            '{"role": "assistant", "content": "", "tool_calls": [' + tool_call + ']}, '
            '{"role": "tool", "tool_call_id": "call_1", "content": "done"}]}')
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", data=body,
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200
            assert (await FrameReader(resp).rest())[-1].data == "[DONE]"
        await until(lambda: writer.written_total + writer.dropped_total == 1)
    assert (writer.written_total, writer.dropped_total) == (1, 0)
    (stored,) = await writer.store.recent(limit=1)
    (call,) = stored["messages"][1]["tool_calls"]
    nested = call.pop("x")
    assert call == {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    levels = 1
    while nested:  # a walk: comparing 900 levels would recurse as deep
        (nested,) = nested
        levels += 1
    assert levels == depth


@pytest.mark.parametrize("parameter", ["model", "before"])
async def test_nul_in_a_query_parameter_is_a_400(gateway_factory, store_url, parameter):
    gateway = await gateway_factory(exchange_log_url=store_url)
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.v1 + f"/exchanges?{parameter}=a%00b") as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_value")
    assert error["message"] == f"'{parameter}' must not contain NUL"


async def test_the_list_pages_filters_and_counts_tokens(gateway_factory, store_url):
    gateway = await gateway_factory(exchange_log_url=store_url)
    async with aiohttp.ClientSession() as http:
        for index, model in enumerate(["alpha", "beta", "alpha", "beta", "alpha"]):
            await stream_text(http, gateway.url, chat(f"page {index} [sim tokens=3]", model=model))
            await written(gateway.state.exchanges.writer, index + 1)

        async def listing(query: str) -> list[dict]:
            async with http.get(gateway.v1 + "/exchanges" + query) as resp:
                assert resp.status == 200
                return (await resp.json())["data"]

        everything = await listing("")
        assert [e["model"] for e in everything] == ["alpha", "beta", "alpha", "beta", "alpha"]
        assert [e["created"] for e in everything] == sorted(
            (e["created"] for e in everything), reverse=True
        )
        first_two = await listing("?limit=2")
        assert first_two == everything[:2]
        after = await listing(f"?limit=2&before={first_two[-1]['id']}")
        assert after == everything[2:4]
        alphas = await listing("?model=alpha")
        assert [e["id"] for e in alphas] == [e["id"] for e in everything if e["model"] == "alpha"]
        for bad in ("0", "1001", "ten", "-1"):
            async with http.get(gateway.v1 + "/exchanges?limit=" + bad) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["code"] == "invalid_value"
        metrics = await scrape(http, gateway.url)
    assert metrics.one("gateway_tokens_total", direction="completion", model="alpha",
                       upstream="default") == 9
    assert metrics.one("gateway_tokens_total", direction="completion", model="beta") == 6
    assert metrics.one("gateway_exchange_log_written_total") == 5
    assert metrics.one("gateway_exchange_log_dropped_total") == 0


async def test_tokens_are_counted_with_the_log_off(gateway_factory):
    gateway = await gateway_factory()
    async with aiohttp.ClientSession() as http:
        await stream_text(http, gateway.url, chat("count me [sim tokens=7]"))
        async with http.get(gateway.v1 + "/exchanges") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "exchange_log_off"
        metrics = await scrape(http, gateway.url)
    assert metrics.one("gateway_tokens_total", direction="completion", model="sim",
                       upstream="default") == 7
    assert gateway.state.exchanges.recorder.open_calls == 0


@pytest.mark.parametrize(
    ("api_keys", "admin_keys", "presented", "status"),
    [
        ((), (), None, 200),  # no auth at all: the demo
        (("client",), (), "client", 403),  # auth on, no admin key configured
        (("client",), ("admin",), "client", 403),
        (("client",), ("admin",), None, 401),
        (("client",), ("admin",), "admin", 200),
        ((), ("admin",), None, 401),
        ((), ("admin",), "wrong", 401),
        ((), ("admin",), "admin", 200),
    ],
)
async def test_admin_keys_guard_the_list(gateway_factory, tmp_path, api_keys, admin_keys,
                                         presented, status):
    gateway = await gateway_factory(
        exchange_log_url=f"sqlite:///{tmp_path}/log.db",
        gateway_api_keys=api_keys,
        gateway_admin_keys=admin_keys,
    )
    headers = {} if presented is None else {"Authorization": f"Bearer {presented}"}
    async with aiohttp.ClientSession() as http, http.get(
        gateway.v1 + "/exchanges", headers=headers
    ) as resp:
        body = await resp.json()
    assert resp.status == status, body
    if status != 200:
        assert set(body["error"]) == {"message", "type", "code"}


async def test_api_key_ids_are_hashes_never_keys(gateway_factory, tmp_path):
    gateway = await gateway_factory(
        exchange_log_url=f"sqlite:///{tmp_path}/log.db",
        exchange_log_content=True,
        gateway_api_keys=("sk-client-one", "sk-client-two"),
        gateway_admin_keys=("sk-admin",),
        coalesce_scope="global",
    )
    prompt = "shared by two keys [sim ttft_ms=100 tokens=3]"
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(
            stream_text(http, gateway.url, chat(prompt), {"Authorization": f"Bearer {key}"})
            for key in ("sk-client-one", "sk-client-two", "sk-client-one")
        ))
        await written(gateway.state.exchanges.writer, 1)
        async with http.get(gateway.v1 + "/exchanges",
                            headers={"Authorization": "Bearer sk-admin"}) as resp:
            (exchange,) = (await resp.json())["data"]
    assert exchange["subscribers"] == 3
    assert sorted(exchange["api_key_ids"]) == sorted(
        hashlib.sha256(key.encode()).hexdigest() for key in ("sk-client-one", "sk-client-two")
    )
    stored = files_bytes(tmp_path)
    assert b"sk-client" not in stored


async def test_bin_exchanges_reads_the_burst_from_the_database(gateway_factory, store_url):
    """The burst's one exchange, 2 messages and 50 subscribers, as the
    command prints it from the database alone (no gateway needed)."""
    gateway = await gateway_factory(exchange_log_url=store_url)
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(
            stream_text(http, gateway.url, chat("burst for the table [sim ttft_ms=50 tokens=4]"))
            for _ in range(50)
        ))
    await written(gateway.state.exchanges.writer, 1)
    for argv, expect in ((["--db", store_url], "table"), (["--db", store_url, "--json"], "json")):
        process = await asyncio.create_subprocess_exec(
            str(ROOT / "bin" / "exchanges"), *argv, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err
        lines = out.decode().splitlines()
        if expect == "table":
            header, row = lines
            columns = dict(zip(header.split(), row.split()[1:], strict=True))  # date, time
            assert (columns["MSGS"], columns["SUBS"], columns["OUTCOME"]) == ("2", "50", "complete")
        else:
            (line,) = lines
            exchange = json.loads(line)
            assert (len(exchange["messages"]), exchange["subscribers"]) == (2, 50)


async def bin_exchanges(*argv: str) -> tuple[int, str, str]:
    """``bin/exchanges`` run as an operator runs it: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        str(ROOT / "bin" / "exchanges"), *argv, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_bin_exchanges_prints_control_characters_of_a_model_escaped(
    gateway_factory, tmp_path
):
    """A model name is the client's to choose: one holding a terminal escape
    and a line break is one row of the table, its control characters shown
    as escapes, never sent raw to the operator's terminal."""
    url = f"sqlite:///{tmp_path}/exchanges.db"
    gateway = await gateway_factory(exchange_log_url=url)
    async with aiohttp.ClientSession() as http:
        await stream_text(http, gateway.url,
                          chat("escapes [sim tokens=2]", model="sim\x1b[2J\nforged\x9b1m"))
    await written(gateway.state.exchanges.writer, 1)
    status, out, err = await bin_exchanges("--db", url)
    assert (status, err) == (0, "")
    header, row = out.splitlines()
    assert row.split()[3] == "sim\\x1b[2J\\nforged\\x9b1m"
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in out.replace("\n", ""))


@pytest.mark.parametrize("answer", ["page", "other-json", "bad-port"])
async def test_bin_exchanges_names_an_answer_that_is_no_list_of_exchanges(answer):
    """A --url that is not a gateway (a sign-in page a proxy answers with
    200, another JSON service) or not a URL at all: one line saying so and
    exit status 1, never a traceback."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>sign in</html>", content_type="text/html")

    async def other_json(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/v1/exchanges", page if answer == "page" else other_json)
    async with serving(app) as url:
        if answer == "bad-port":
            url = "http://127.0.0.1:80a"
        status, out, err = await bin_exchanges("--url", url)
    assert (status, out) == (1, "")
    (line,) = err.splitlines()
    assert line.startswith(f"exchanges: {url}: ")
    assert "Traceback" not in err


async def test_bin_exchanges_never_creates_a_sqlite_file(tmp_path):
    """A mistyped path is an error saying so, not a new empty log."""
    path = tmp_path / "typo" / "dir" / "exchanges.db"
    status, out, err = await bin_exchanges("--db", f"sqlite:///{path}")
    assert (status, out, err) == (1, "", f"exchanges: sqlite {path}: no such file\n")
    assert not (tmp_path / "typo").exists()


async def test_bin_exchanges_reads_postgres_with_select_rights_only(gateway_factory, postgres):
    """A reader role (SELECT only) can list the log; a database without one
    is an error saying so, and is left without tables."""
    url = postgres.create_database("exchanges_for_a_reader")
    gateway = await gateway_factory(exchange_log_url=url)
    async with aiohttp.ClientSession() as http:
        await stream_text(http, gateway.url, chat("to read back [sim tokens=2]"))
    await written(gateway.state.exchanges.writer, 1)
    admin = await asyncpg.connect(url)
    try:
        await admin.execute("CREATE ROLE exchanges_reader LOGIN")
        await admin.execute("GRANT SELECT ON exchanges, exchange_log_migrations TO exchanges_reader")
    finally:
        await admin.close()
    status, out, err = await bin_exchanges(
        "--db", url.replace("postgres@", "exchanges_reader@"), "--json")
    assert (status, err) == (0, "")
    (line,) = out.splitlines()
    assert json.loads(line)["outcome"] == "complete"

    empty = postgres.create_database("exchanges_none_here")
    status, out, err = await bin_exchanges("--db", empty)
    assert (status, out) == (1, "")
    assert err == (f"exchanges: postgresql 127.0.0.1:{postgres.port}/exchanges_none_here: no "
                   "exchange log there (no table exchange_log_migrations); a gateway creates it "
                   "at its first start\n")
    admin = await asyncpg.connect(empty)
    try:
        assert await admin.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await admin.close()


async def test_after_the_first_start_insert_and_select_rights_are_enough(
    gateway_factory, postgres
):
    """The documented grants: once the schema is current, a gateway whose
    role may only INSERT and SELECT (and read the schema version) connects
    and writes: no DDL runs at its start."""
    url = postgres.create_database("exchanges_least_rights")
    store = PostgresStore(url)
    await store.connect()  # the first start, by the owner: creates the tables
    await store.aclose()
    admin = await asyncpg.connect(url)
    try:
        await admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await admin.execute("CREATE ROLE exchanges_writer LOGIN")
        await admin.execute("GRANT INSERT, SELECT ON exchanges TO exchanges_writer")
        await admin.execute("GRANT SELECT ON exchange_log_migrations TO exchanges_writer")
    finally:
        await admin.close()
    gateway = await gateway_factory(
        exchange_log_url=url.replace("postgres@", "exchanges_writer@"))
    writer = gateway.state.exchanges.writer
    assert writer.connected
    async with aiohttp.ClientSession() as http:
        await stream_text(http, gateway.url, chat("least rights [sim tokens=2]"))
        await written(writer, 1)
        async with http.get(gateway.v1 + "/exchanges") as resp:
            assert resp.status == 200
            assert len((await resp.json())["data"]) == 1


async def test_a_page_stops_before_4_mib_and_says_more_follow(gateway_factory, tmp_path):
    """With content, records of 1 MB: a page of up to 1000 holds what fits
    in 4 MiB (a record bigger than that comes alone), ``has_more`` tells
    whether to go on, and paging with ``before`` reads each record once."""
    path = tmp_path / "exchanges.db"
    store = SqliteStore(str(path))
    await store.connect()
    sizes = [1_000_000] * 9 + [5_000_000]  # oldest first: the newest is the big one
    for number, size in enumerate(sizes):
        await store.write([dataclasses.replace(
            exchange(number), messages=({"role": "user", "content": "x" * size},))])
    await store.aclose()
    gateway = await gateway_factory(exchange_log_url=f"sqlite:///{path}", exchange_log_content=True)
    pages: list[tuple[int, bool, int]] = []
    ids: list[str] = []
    query = "limit=1000"
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(gateway.v1 + "/exchanges?" + query) as resp:
                assert resp.status == 200
                body = await resp.read()
            page = json.loads(body)
            pages.append((len(page["data"]), page["has_more"], len(body) // 1_000_000))
            ids += [record["id"] for record in page["data"]]
            if not page["has_more"]:
                break
            query = f"limit=1000&before={ids[-1]}"
    assert pages == [(1, True, 5), (4, True, 4), (4, True, 4), (1, False, 1)]
    assert ids == [f"xchg_{number:04d}" for number in reversed(range(10))]


async def test_every_api_sharing_a_call_is_one_of_its_subscribers(gateway_factory, tmp_path):
    """A streaming and a non-streaming OpenAI request and a native stream
    with the same prompt share one upstream call: one exchange, three ids."""
    gateway = await gateway_factory(exchange_log_url=f"sqlite:///{tmp_path}/log.db")
    body = chat("three ways [sim ttft_ms=150 tokens=4]")

    async def post(path: str, payload: dict) -> str:
        async with http.post(gateway.v1 + path, json=payload) as resp:
            assert resp.status == 200
            await resp.read()
            return resp.headers["X-Request-Id"]

    async with aiohttp.ClientSession() as http:
        ids = await asyncio.gather(
            post("/chat/completions", body),
            post("/chat/completions", {**body, "stream": False}),
            post("/stream", body),
        )
        await written(gateway.state.exchanges.writer, 1)
        async with http.get(gateway.v1 + "/exchanges") as resp:
            (exchange,) = (await resp.json())["data"]
    assert gateway.state.registry.statistics().upstream_calls_total == 1
    assert sorted(exchange["request_ids"]) == sorted(ids)
    assert exchange["subscribers"] == 3 and len(exchange["messages"]) == 2


async def test_a_file_that_is_not_a_database_degrades_only_the_log(gateway_factory, tmp_path):
    path = tmp_path / "log.db"
    path.write_bytes(b"this is not a SQLite database, it is a text file" * 100)
    gateway = await gateway_factory(exchange_log_url=f"sqlite:///{path}")
    async with aiohttp.ClientSession() as http:
        _, text = await stream_text(http, gateway.url, chat("still streams [sim tokens=2]"))
        async with http.get(gateway.v1 + "/exchanges") as resp:
            assert resp.status == 503
    assert text and not gateway.state.exchanges.writer.connected
    # Nor does a failed connect leave a connection's thread behind (one that
    # is not a daemon keeps the process from exiting).
    before = set(threading.enumerate())
    with pytest.raises(StoreUnavailable):
        await SqliteStore(str(path)).connect()
    for thread in set(threading.enumerate()) - before:
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive()


async def test_a_read_of_the_exchange_log_is_logged_a_health_check_is_not(gateway_factory, store_url):
    """Reading the exchange log shows other clients' calls (their prompts,
    with content kept): each read gets its request line, who asked
    included, where the ops endpoints' other successful GETs (health
    checks, scrapes) get none."""
    gateway = await gateway_factory(exchange_log_url=store_url)
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.get(gateway.v1 + "/exchanges?limit=5") as resp:
                assert resp.status == 200
            async with http.get(gateway.url + "/healthz") as resp:
                assert resp.status == 200
    lines = [line for line in logs if line["event"] == "request"]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("GET", "/v1/exchanges", 200)
    ]
    assert lines[0]["client"] == "127.0.0.1"
