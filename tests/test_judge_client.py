"""EndpointJudge against a scripted local stand-in for a chat-completions server."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from almost_utils.judge_client import (
    EndpointJudge,
    JudgeError,
    judge_both_orders,
    parse_verdict,
)

KEY = "sk-test-0123456789-secret"


def reply(text):
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


class Script:
    """What the stand-in server answers, in order, and what it received.

    Each entry is ``(status, body)`` - a dict/list is sent as JSON, a str as-is - or
    ``("sleep", seconds)`` to stall past the client's timeout.
    """

    def __init__(self):
        self.responses = []
        self.requests = []
        self.lock = threading.Lock()

    def next(self):
        with self.lock:
            if self.responses:
                return self.responses.pop(0)
        return 500, "script exhausted"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    script: Script


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        script = self.server.script
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        with script.lock:
            script.requests.append({"path": self.path, "headers": dict(self.headers), "json": parsed})
        status, payload = script.next()
        if status == "sleep":
            time.sleep(payload)
            status, payload = reply("Verdict: A")  # too late: the client has given up
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client timed out and hung up
            pass


@pytest.fixture
def server():
    """Yields (base_url, script); the server stops after the test."""
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.script = Script()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", httpd.script
    finally:
        httpd.shutdown()
        httpd.server_close()


def make_judge(url, **kw):
    kw.setdefault("timeout", 2.0)
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0)
    return EndpointJudge(url=url, model="judge-model", **kw)


# ---------------------------------------------------------------- normal operation


@pytest.mark.parametrize("text, expected", [
    ("A is more accurate.\nVerdict: A", "A"),
    ("B answers the question.\n**Verdict:** B", "B"),
    ("Both are equally fine.\nverdict: TIE", "tie"),
])
def test_verdict_normal(server, text, expected):
    url, script = server
    script.responses = [reply(text)]
    judge = make_judge(url + "/")  # a trailing slash must not double up in the path
    assert judge.verdict("What is 2+2?", "4", "5") == expected

    (req,) = script.requests
    assert req["path"] == "/v1/chat/completions"
    body = req["json"]
    assert body["model"] == "judge-model"
    assert body["temperature"] == 0
    assert isinstance(body["max_tokens"], int) and body["max_tokens"] > 0
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user"]
    user = body["messages"][1]["content"]
    assert "What is 2+2?" in user and "4" in user and "5" in user
    assert "Verdict" in body["messages"][0]["content"]


def test_chat_returns_content_and_sends_payload(server):
    url, script = server
    script.responses = [reply("hello")]
    judge = make_judge(url)
    msgs = [{"role": "user", "content": "hi"}]
    assert judge.chat(msgs, max_tokens=7) == "hello"
    assert script.requests[0]["json"] == {
        "model": "judge-model", "messages": msgs, "temperature": 0, "max_tokens": 7}
    assert "Authorization" not in script.requests[0]["headers"]  # no key, no header


def test_key_sent_as_bearer_and_never_shown(server):
    url, script = server
    # The server echoes the key in its error body, as some do; it must still not surface.
    script.responses = [reply("Verdict: A"), (401, {"error": f"invalid key {KEY}"})]
    judge = make_judge(url, api_key=KEY)
    assert judge.verdict("q", "a", "b") == "A"
    assert script.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(judge)
    assert KEY not in str(judge.describe())
    with pytest.raises(JudgeError) as info:
        judge.chat([{"role": "user", "content": "x"}])
    assert KEY not in str(info.value)
    assert "401" in str(info.value) and url in str(info.value)


def test_describe(server):
    url, _ = server
    assert make_judge(url, api_key=KEY).describe() == {"url": url, "model": "judge-model"}


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retry_after_transient_status(server, status):
    url, script = server
    script.responses = [(status, {"error": "busy"}), reply("Verdict: B")]
    assert make_judge(url).verdict("q", "a", "b") == "B"
    assert len(script.requests) == 2


def test_retry_after_timeout(server):
    url, script = server
    script.responses = [("sleep", 0.6), reply("Verdict: tie")]
    judge = make_judge(url, timeout=0.2)
    start = time.monotonic()
    assert judge.verdict("q", "a", "b") == "tie"
    assert time.monotonic() - start < 2
    assert len(script.requests) == 2


def test_all_attempts_fail(server):
    url, script = server
    script.responses = [(500, "boom")] * 3
    judge = make_judge(url, retries=2)
    with pytest.raises(JudgeError) as info:
        judge.chat([{"role": "user", "content": "x"}])
    assert len(script.requests) == 3
    message = str(info.value)
    assert url in message and "500" in message and "3 attempts" in message


def test_unreachable_endpoint():
    # A port that was just free: the connection is refused on every attempt.
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    httpd.server_close()
    judge = make_judge(f"http://127.0.0.1:{port}/v1", retries=1, timeout=0.5)
    with pytest.raises(JudgeError, match="2 attempts"):
        judge.chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_error_not_retried(server, status):
    url, script = server
    script.responses = [(status, {"error": "no"}), reply("Verdict: A")]
    with pytest.raises(JudgeError) as info:
        make_judge(url, api_key=KEY).verdict("q", "a", "b")
    assert len(script.requests) == 1
    assert str(status) in str(info.value)
    assert KEY not in str(info.value)


@pytest.mark.parametrize("bad", [
    (200, "<html>gateway hiccup</html>"),       # not JSON
    (200, {"error": "overloaded"}),              # no choices
    (200, {"choices": []}),                      # empty choices
    (200, {"choices": [{"message": {"content": None}}]}),  # content not a string
])
def test_malformed_body_retried(server, bad):
    url, script = server
    script.responses = [bad, reply("Verdict: A")]
    assert make_judge(url).verdict("q", "a", "b") == "A"
    assert len(script.requests) == 2


def test_backoff_doubles(server, monkeypatch):
    url, script = server
    script.responses = [(500, "x")] * 4
    sleeps = []
    monkeypatch.setattr("almost_utils.judge_client.time.sleep", sleeps.append)
    with pytest.raises(JudgeError):
        make_judge(url, retries=3, backoff=0.5).chat([{"role": "user", "content": "x"}])
    assert sleeps == [0.5, 1.0, 2.0]


# ---------------------------------------------------------------- unparsable verdicts


def test_missing_verdict_asked_again(server):
    url, script = server
    script.responses = [reply("Hmm, hard to say."), reply("On reflection.\nVerdict: B")]
    assert make_judge(url).verdict("q", "a", "b") == "B"
    assert len(script.requests) == 2
    assert script.requests[0]["json"] == script.requests[1]["json"]  # the same request again


def test_never_a_verdict_is_invalid(server):
    url, script = server
    script.responses = [reply("I refuse to choose.")] * 3
    assert make_judge(url, retries=2).verdict("q", "a", "b") == "invalid"
    assert len(script.requests) == 3


@pytest.mark.parametrize("text, expected", [
    ("Verdict: A", "A"),
    ("verdict: b", "B"),
    ("VERDICT: Tie", "tie"),
    ("**Verdict:** A", "A"),
    ("**Verdict**: B", "B"),
    ("Verdict: **tie**", "tie"),
    ("First thought - Verdict: A. But on reflection B is safer.\nVerdict: B", "B"),
    ("Reasoning...\n\nFinal Verdict: A.", "A"),
    ("No decision here.", None),
    ("The verdict about this is unclear.", None),
    ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


# ---------------------------------------------------------------- both orders


class FakeJudge:
    def __init__(self, verdicts):
        self.verdicts = list(verdicts)
        self.calls = []

    def verdict(self, question, answer_a, answer_b):
        self.calls.append((question, answer_a, answer_b))
        return self.verdicts.pop(0)


@pytest.mark.parametrize("verdicts, outcome, invalid", [
    (["A", "B"], 1.0, 0),          # answer_1 wins in both orders
    (["B", "A"], 0.0, 0),          # answer_2 wins in both orders
    (["A", "A"], 0.5, 0),          # always slot A: position bias, no real preference
    (["tie", "B"], 0.5, 0),
    (["A", "invalid"], 0.5, 1),
    (["invalid", "invalid"], 0.5, 2),
])
def test_judge_both_orders(verdicts, outcome, invalid):
    judge = FakeJudge(verdicts)
    result = judge_both_orders(judge, "q", "one", "two")
    assert result == {"first": verdicts[0], "second": verdicts[1], "outcome": outcome, "invalid": invalid}
    assert judge.calls == [("q", "one", "two"), ("q", "two", "one")]


def test_judge_both_orders_over_http(server):
    url, script = server
    script.responses = [reply("Verdict: A"), reply("Verdict: B")]
    result = judge_both_orders(make_judge(url), "q", "good", "bad")
    assert result["outcome"] == 1.0
    first_user = script.requests[0]["json"]["messages"][1]["content"]
    second_user = script.requests[1]["json"]["messages"][1]["content"]
    assert first_user.index("good") < first_user.index("bad")
    assert second_user.index("bad") < second_user.index("good")


# ---------------------------------------------------------------- from_env


def test_from_env_unset():
    assert EndpointJudge.from_env({}) is None
    assert EndpointJudge.from_env({"ALMOST_JUDGE_URL": "", "ALMOST_JUDGE_MODEL": "m"}) is None


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.delenv("ALMOST_JUDGE_URL", raising=False)
    assert EndpointJudge.from_env() is None
    monkeypatch.setenv("ALMOST_JUDGE_URL", "http://localhost:1/v1")
    monkeypatch.setenv("ALMOST_JUDGE_MODEL", "m")
    assert EndpointJudge.from_env().model == "m"


def test_from_env_needs_model():
    with pytest.raises(ValueError, match="ALMOST_JUDGE_MODEL"):
        EndpointJudge.from_env({"ALMOST_JUDGE_URL": "http://localhost:8000/v1"})


def test_from_env_bad_scheme():
    with pytest.raises(ValueError, match="ALMOST_JUDGE_URL"):
        EndpointJudge.from_env({"ALMOST_JUDGE_URL": "localhost:8000/v1", "ALMOST_JUDGE_MODEL": "m"})


def test_from_env_bad_timeout():
    with pytest.raises(ValueError, match="ALMOST_JUDGE_TIMEOUT"):
        EndpointJudge.from_env({"ALMOST_JUDGE_URL": "http://h/v1", "ALMOST_JUDGE_MODEL": "m",
                                "ALMOST_JUDGE_TIMEOUT": "soon"})


def test_from_env_full():
    judge = EndpointJudge.from_env({
        "ALMOST_JUDGE_URL": "https://judge.example/v1",
        "ALMOST_JUDGE_MODEL": "big-judge",
        "ALMOST_JUDGE_API_KEY": KEY,
        "ALMOST_JUDGE_TIMEOUT": "12.5",
    })
    assert (judge.url, judge.model, judge.api_key, judge.timeout) == (
        "https://judge.example/v1", "big-judge", KEY, 12.5)
    assert KEY not in repr(judge)
    assert EndpointJudge.from_env({"ALMOST_JUDGE_URL": "http://h/v1", "ALMOST_JUDGE_MODEL": "m"}).api_key is None
