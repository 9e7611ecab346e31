"""The S_q judge client (longsft/evaluate/judge.py) against a stand-in OpenAI-compatible server the test starts on
127.0.0.1 (nothing is sent anywhere else): scripted answers, fenced JSON, malformed JSON, a missing or out-of-range
dimension, a timeout, a 429 then success, a server that keeps failing, a wrong key; the aggregation checked against
LongWriter's definition written out here; the cache (a rerun sends nothing new).

    python -m pytest -q tests/evaluate/test_judge.py
"""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from longsft.errors import UserError
from longsft.evaluate import judge as J
import evaluate as evaluate_entry
from tests.records import write_jsonl

DIMS = J.JUDGE_DIMENSIONS


def answer(*values, drop=(), fence=False, **over):
    obj = {d: v for d, v in zip(DIMS, values) if d not in drop}
    obj.update(over)
    text = json.dumps(obj)
    return f"```json\n{text}\n```" if fence else text


# case name (written into the response being judged) -> the answers the server gives, in order (the last repeats);
# an int is an HTTP status, ("sleep", s) waits s seconds before the next entry's answer
SCRIPT = {
    "good": [answer(5, 4, 4, 5, 3, 4)],
    "fenced": [answer(3, 3, 2, 4, 2, 3, fence=True)],
    "malformed-then-good": ["Sure! {\"Relevance\": 5, ", "not json at all", answer(4, 4, 4, 4, 4, 4)],
    "always-malformed": ["Scores: five, four, three"],
    "missing-accuracy": [answer(2, 0, 3, 3, 3, 3, drop=("Accuracy",))],
    "out-of-range": [answer(7, 3, 3, 3, 3, 3), answer(9, 3, 3, 3, 3, "3")],  # 7 > 5; "3" a string: invalid
    "429-then-good": [429, 429, answer(1, 2, 3, 4, 5, 1)],
    "timeout-then-good": [("sleep", 1.5), answer(2, 2, 2, 2, 2, 2)],
    "server-down": [500],
}


class StandIn:
    """A chat-completions server on 127.0.0.1 answering by the case named in the judged response."""

    def __init__(self, script, status=None):
        self.script, self.status, self.calls, self.bodies = script, status, {}, []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                case = re.search(r"CASE:([\w-]+)", prompt).group(1)
                with outer.lock:
                    outer.bodies.append((self.path, dict(self.headers), body))
                    k = outer.calls.get(case, 0)
                    outer.calls[case] = k + 1
                steps = outer.script[case]
                step = steps[min(k, len(steps) - 1)]
                if isinstance(step, tuple):  # a slow first answer: the client times out, then asks again
                    time.sleep(step[1])
                    step = steps[k + 1]
                if outer.status or isinstance(step, int):
                    code = outer.status or step
                    self.send_response(code)
                    if code == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted"}}')
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": step}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = StandIn(SCRIPT)
    yield s
    s.close()


def items():
    return [{"prompt": f"Write about {c}", "type": "long" if i % 2 else "short", "length": 100,
             "response": f"CASE:{c} some text"} for i, c in enumerate(SCRIPT)]


def settings(url, **kw):
    return J.JudgeSettings(url, "judge-1", api_key="sk-test", timeout=0.5, http_retries=3, parse_retries=2,
                           backoff=0.01, workers=3, **kw)


def test_parse_judgement():
    assert J.parse_judgement(answer(1, 2, 3, 4, 5, 5)) == ({d: float(v) for d, v in zip(DIMS, (1, 2, 3, 4, 5, 5))},
                                                           [])
    assert J.parse_judgement(answer(1, 2, 3, 4, 5, 5, fence=True))[1] == []
    assert J.parse_judgement(answer(1, 2.5, 3, 4, 5, True))[1] == ["Reading Experience"]  # a bool is no score
    assert J.parse_judgement(answer(0, 2, 3, 4, 5, 6))[1] == ["Relevance", "Reading Experience"]
    for bad in ("", "[1, 2]", "{'Relevance': 3}", "Scores: {}" , "```json\n{\n```", "null"):
        with pytest.raises(ValueError):
            J.parse_judgement(bad)


def expected_quality(per_item):
    """LongWriter's S_q with missing dimensions left out of their means (not set to 3)."""
    dims = {}
    for d in DIMS:
        values = [s[d] for s in per_item if d in s]
        if values:
            dims[d] = (sum(values) / len(values) - 1) * 25
    return sum(dims.values()) / len(dims), dims


def test_scripted_answers_retries_and_the_cache(tmp_path, server):
    waits = []
    client = J.JudgeClient(settings(server.url), sleep=waits.append)
    cache = J.JudgeCache(tmp_path / "judgments.jsonl")
    its = items()
    got = J.judge_items(its, client, cache)
    by_case = {it["response"].split()[0][5:]: g for it, g in zip(its, got)}

    assert by_case["server-down"] is None  # no answer after 1 + 3 tries: failed, not cached
    assert server.calls["server-down"] == 4 and len(waits) >= 3
    assert by_case["good"]["scores"] == dict(zip(DIMS, (5.0, 4.0, 4.0, 5.0, 3.0, 4.0))) and server.calls["good"] == 1
    assert by_case["fenced"]["missing"] == []
    assert by_case["malformed-then-good"]["scores"] == {d: 4.0 for d in DIMS}
    assert server.calls["malformed-then-good"] == 3
    assert by_case["always-malformed"]["scores"] == {} and by_case["always-malformed"]["missing"] == list(DIMS)
    assert server.calls["always-malformed"] == 3  # 1 + parse_retries 2
    assert by_case["missing-accuracy"]["missing"] == ["Accuracy"] and server.calls["missing-accuracy"] == 3
    assert by_case["out-of-range"]["missing"] == ["Relevance"]  # the first answer had 5 of 6; the second 4
    assert by_case["out-of-range"]["scores"]["Reading Experience"] == 3.0
    assert by_case["429-then-good"]["scores"]["Clarity"] == 4.0 and server.calls["429-then-good"] == 3
    assert by_case["timeout-then-good"]["scores"] == {d: 2.0 for d in DIMS}
    assert server.calls["timeout-then-good"] == 2

    # what went over the wire: the OpenAI chat-completions request, the key as a bearer token, our prompt
    path, headers, body = server.bodies[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["temperature"] == 0.5 and body["max_tokens"] == 1024
    assert "ignore any word count" in body["messages"][0]["content"]

    report = J.quality_report(its, got)
    answered = [g["scores"] for g in got if g is not None]
    s_q, dims = expected_quality(answered)
    assert report["S_q"] == pytest.approx(s_q, abs=1e-12) and report["dimensions"] == pytest.approx(dims)
    assert report["judged"] == 8 and report["failed"] == 1
    assert report["missing"] == {"Relevance": 2, "Accuracy": 2, "Coherence": 1, "Clarity": 1,
                                 "Breadth and Depth": 1, "Reading Experience": 1}
    short = [g["scores"] for it, g in zip(its, got) if g is not None and it["type"] == "short"]
    assert report["by_type"]["short"] == pytest.approx(expected_quality(short)[0])

    # a rerun pays for nothing already answered: only the failed item is asked again
    before = dict(server.calls)
    again = J.judge_items(its, J.JudgeClient(settings(server.url), sleep=waits.append),
                          J.JudgeCache(tmp_path / "judgments.jsonl"))
    assert [g and g["scores"] for g in again] == [g and g["scores"] for g in got]
    assert {c: n - before[c] for c, n in server.calls.items() if n != before[c]} == {"server-down": 4}


def test_a_wrong_key_stops_the_run(tmp_path):
    server = StandIn(SCRIPT, status=401)
    try:
        client = J.JudgeClient(settings(server.url))
        with pytest.raises(UserError, match=r"HTTP 401 \(the API key is missing or wrong"):
            J.judge_items(items()[:2], client, J.JudgeCache(tmp_path / "c.jsonl"))
    finally:
        server.close()


def test_evaluate_py_judges_a_prediction_file(tmp_path, server, monkeypatch):
    """--predictions + --judge_base_url: S_q in scores.json with its parts; the key from the named variable."""
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-from-env")
    good = [it for it in items() if it["response"].split()[0][5:] in ("good", "fenced", "429-then-good",
                                                                         "missing-accuracy")]
    pred = write_jsonl(tmp_path / "pred.jsonl", good)
    argv = ["--predictions", str(pred), "--output_dir", str(tmp_path / "o"), "--judge_base_url", server.url,
            "--judge_model", "judge-1", "--judge_api_key_env", "MY_JUDGE_KEY", "--judge_retries", "1"]
    scores = evaluate_entry.main(argv)
    per = [J.parse_judgement(SCRIPT[c][-1])[0] for c in ("good", "fenced", "429-then-good", "missing-accuracy")]
    assert scores["S_q"] == pytest.approx(expected_quality(per)[0], abs=1e-12)
    assert scores["quality"]["missing"]["Accuracy"] == 1 and scores["quality"]["failed"] == 0
    assert set(scores["by_type"]["short"]) == {"S_l", "count", "S_q"}
    assert server.bodies[-1][1]["Authorization"] == "Bearer sk-from-env"
    on_disk = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert on_disk["S_q"] == scores["S_q"] and "judge_api_key_env" not in on_disk["settings"]
    sent = len(server.bodies)
    assert evaluate_entry.main(argv)["S_q"] == scores["S_q"] and len(server.bodies) == sent  # cached
