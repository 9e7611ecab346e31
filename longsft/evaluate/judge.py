"""LongBench-Write's quality score S_q: an LLM judge behind any OpenAI-compatible endpoint. No torch.

    export OPENAI_API_KEY=...        # read from the environment (--judge_api_key_env names another variable)
    python evaluate.py --predictions eval/run/predictions.jsonl --output_dir eval/run \\
        --judge_base_url https://api.openai.com/v1 --judge_model gpt-4o-2024-05-13
    python evaluate.py --predictions pred.jsonl --output_dir /tmp/q --judge_base_url http://127.0.0.1:8000/v1 \\
        --judge_model local     # a local server (vLLM, llama.cpp): no key needed

What it does (LongWriter's eval_quality.py defines the score; the prompt and the client are written here):
- each (prompt, response) is sent once as a user message to POST {base_url}/chat/completions (temperature 0.5,
  max_tokens 1024 as upstream) with JUDGE_PROMPT, which asks for a JSON object scoring the six dimensions
  JUDGE_DIMENSIONS from 1 to 5 and tells the judge to ignore the length requirement (S_l measures that);
- HTTP 429, 408, 5xx, timeouts and connection errors are retried with exponential backoff (Retry-After honoured,
  capped); 401/403/404 stop the run with a UserError naming the setting to fix; another 4xx fails that item only;
- the answer is parsed strictly: one JSON object (optionally inside a ```json fence), each dimension a number in
  [1, 5]. Malformed JSON, or a dimension missing or out of range, asks again (--judge_retries times); the most
  complete answer is kept and every dimension still missing is counted per dimension in scores.json (upstream
  silently used 3), never defaulted;
- every answer received is appended to the cache file (judgments.jsonl in --output_dir) under the SHA-256 of
  (judge model, prompt, response): a rerun, or a run killed half way, never pays for an answer twice. Items with
  no answer (the endpoint kept failing) are not cached and are retried by the next run; they are counted as
  `failed`.
Score: for each dimension d, D_d = (mean of its scores - 1) x 25 (0-100); S_q = the mean of the six D_d.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from longsft.errors import UserError

JUDGE_DIMENSIONS = ("Relevance", "Accuracy", "Coherence", "Clarity", "Breadth and Depth", "Reading Experience")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = {401: "the API key is missing or wrong", 403: "the key may not use this model or endpoint",
                404: "no such endpoint or model: check --judge_base_url (it usually ends in /v1) and --judge_model"}

JUDGE_PROMPT = """You are grading a piece of writing that an AI assistant produced for a user's request.

Grade it on each of these six dimensions with a whole number from 1 (very poor) to 5 (excellent):
- Relevance: does it address what the user asked for, in content and form?
- Accuracy: are its facts, reasoning and claims correct?
- Coherence: is it well organised, with parts that follow from one another?
- Clarity: is the language clear and precise, without needless repetition?
- Breadth and Depth: does it cover the topic widely and go into it deeply enough?
- Reading Experience: is it engaging and pleasant to read?

Do not reward or punish the length of the text: ignore any word count the request names and judge only the
quality of what was written.

[User request]
$INST$

[Assistant's text]
$RESPONSE$

Answer with one JSON object and nothing else, with exactly these keys and integer values, for example:
{"Relevance": 4, "Accuracy": 3, "Coherence": 5, "Clarity": 4, "Breadth and Depth": 3, "Reading Experience": 4}"""


class JudgeUnavailable(Exception):
    """No answer for one item after every retry (network, server errors, or a 4xx that concerns that item)."""


@dataclass
class JudgeSettings:
    base_url: str
    model: str
    api_key: Optional[str] = None
    timeout: float = 600.0  # seconds per request (upstream: 600)
    http_retries: int = 8  # retries of one request on 429 / 5xx / timeouts
    parse_retries: int = 4  # new requests when the answer is malformed or incomplete (upstream: 5 tries)
    backoff: float = 2.0  # first wait, doubled per retry
    max_backoff: float = 60.0
    temperature: float = 0.5
    max_tokens: int = 1024
    workers: int = 4


def judge_prompt(instruction: str, response: str) -> str:
    return JUDGE_PROMPT.replace("$INST$", instruction).replace("$RESPONSE$", response)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```$", re.DOTALL)


def parse_judgement(text: str) -> tuple[dict[str, float], list[str]]:
    """(scores of the dimensions given correctly, dimensions missing or invalid) of a judge's answer.
    ValueError when the answer is not one JSON object (optionally fenced)."""
    body = (text or "").strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    obj = json.loads(body)  # json.JSONDecodeError is a ValueError
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    scores, missing = {}, []
    for dim in JUDGE_DIMENSIONS:
        v = obj.get(dim)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 1 <= v <= 5:
            scores[dim] = float(v)
        else:
            missing.append(dim)
    return scores, missing


def cache_key(model: str, prompt: str, response: str) -> str:
    return hashlib.sha256("\0".join((model, prompt, response)).encode("utf-8")).hexdigest()


class JudgeCache:
    """Answers by cache_key, one JSON line each, appended as they arrive (thread-safe); a torn last line (a killed
    run) is ignored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> Optional[dict]:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        with self._lock:
            self.entries[entry["key"]] = entry
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()


class JudgeClient:
    """Chat-completion requests with retries (see the module docstring). `sleep` is replaceable for tests."""

    def __init__(self, settings: JudgeSettings, sleep: Callable[[float], None] = time.sleep):
        self.s = settings
        self.sleep = sleep
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.requests = 0  # HTTP requests sent (retries included)
        self._lock = threading.Lock()

    def _wait(self, attempt: int, retry_after: Optional[str]) -> None:
        wait = min(self.s.max_backoff, self.s.backoff * (2 ** attempt))
        try:
            if retry_after is not None:
                wait = min(self.s.max_backoff, max(0.0, float(retry_after)))
        except ValueError:
            pass
        self.sleep(wait)

    def complete(self, prompt: str) -> str:
        """The judge's answer text to one user message; JudgeUnavailable after the retries."""
        body = json.dumps({"model": self.s.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.s.temperature, "max_tokens": self.s.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.s.api_key:
            headers["Authorization"] = f"Bearer {self.s.api_key}"
        last, retry_after = "no request sent", None
        for attempt in range(self.s.http_retries + 1):
            if attempt:
                self._wait(attempt - 1, retry_after)
            retry_after = None
            with self._lock:
                self.requests += 1
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.s.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                try:
                    content = payload["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    raise JudgeUnavailable(f"{self.url}: an answer without choices[0].message.content: "
                                           f"{json.dumps(payload)[:300]}") from None
                return content if isinstance(content, str) else ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code in FATAL_STATUS:
                    raise UserError(f"judge {self.url} answered HTTP {e.code} ({FATAL_STATUS[e.code]}; key from "
                                    f"--judge_api_key_env, model --judge_model {self.s.model}): {detail}") from None
                if e.code not in RETRY_STATUS:
                    raise JudgeUnavailable(f"HTTP {e.code}: {detail}") from None
                last, retry_after = f"HTTP {e.code}: {detail}", e.headers.get("Retry-After")
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise JudgeUnavailable(f"{self.url}: no answer after {self.s.http_retries + 1} tries (last: {last})")

    def judge(self, instruction: str, response: str) -> dict:
        """{"scores", "missing", "raw", "requests"} of one item: the most complete answer of up to
        1 + parse_retries answers (a complete one ends the asking)."""
        prompt = judge_prompt(instruction, response)
        best, problems = None, []
        for _ in range(self.s.parse_retries + 1):
            raw = self.complete(prompt)
            try:
                scores, missing = parse_judgement(raw)
            except ValueError as e:
                problems.append(f"not one JSON object ({str(e)[:80]})")
                best = best or {"scores": {}, "missing": list(JUDGE_DIMENSIONS), "raw": raw}
                continue
            if best is None or len(scores) > len(best["scores"]):
                best = {"scores": scores, "missing": missing, "raw": raw}
            if not missing:
                break
            problems.append(f"missing or invalid: {', '.join(missing)}")
        return {**best, "problems": problems}


def judge_items(items: list[dict], client: JudgeClient, cache: JudgeCache,
                progress: Optional[Callable[[], None]] = None) -> list[Optional[dict]]:
    """The judgement of each item ({"prompt", "response"}): from the cache, else asked (in client.s.workers
    threads) and cached. None where the judge gave no answer (JudgeUnavailable)."""
    model = client.s.model

    def one(item: dict) -> Optional[dict]:
        key = cache_key(model, item["prompt"], item["response"])
        entry = cache.get(key)
        if entry is None:
            try:
                result = client.judge(item["prompt"], item["response"])
            except JudgeUnavailable as e:
                entry = {"key": key, "error": str(e)}
            else:
                entry = {"key": key, "judge_model": model, **result}
                cache.put(entry)
        if progress:
            progress()
        return None if "error" in entry else entry

    with ThreadPoolExecutor(max_workers=max(1, client.s.workers)) as pool:
        entries = list(pool.map(one, items))
    return entries


def quality_report(items: list[dict], judgements: list[Optional[dict]]) -> dict:
    """S_q and its parts from the judgements of `items` (None: no answer).

    -> {"S_q", "dimensions": {dim: (mean - 1) x 25}, "judged", "failed", "missing": {dim: count},
        "by_type": {type: S_q}}"""
    def score(group: list[dict]) -> tuple[Optional[float], dict]:
        dims = {}
        for dim in JUDGE_DIMENSIONS:
            values = [j["scores"][dim] for j in group if dim in j["scores"]]
            if values:
                dims[dim] = (math.fsum(values) / len(values) - 1.0) * 25.0
        return (math.fsum(dims.values()) / len(dims) if dims else None), dims

    answered = [j for j in judgements if j is not None]
    total, dims = score(answered)
    by_type = {}
    for t in sorted({str(it.get("type", "")) for it in items}):
        group = [j for it, j in zip(items, judgements) if j is not None and str(it.get("type", "")) == t]
        by_type[t] = score(group)[0]
    return {"S_q": total, "dimensions": dims, "judged": len(answered), "failed": len(judgements) - len(answered),
            "missing": {dim: sum(1 for j in answered if dim not in j["scores"]) for dim in JUDGE_DIMENSIONS},
            "by_type": by_type}
