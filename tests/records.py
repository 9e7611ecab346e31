"""Helpers of the data tests (no tests here): write chat records as JSONL, and read supervised label runs.

    from records import write_jsonl, supervised_runs
"""
import json

IGNORE_INDEX = -100


def write_jsonl(path, records):
    """One line per record: a dict is dumped as JSON (non-ASCII kept), a str is written as it is (bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def supervised_runs(labels):
    """Contiguous runs of supervised labels (label != -100), as lists of ids."""
    out, cur = [], []
    for x in labels.tolist() + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            out.append(cur)
            cur = []
    return out


# ----------------------------------------------------------------------------------------------
# Records in the layouts of real third-party data (written here; users' data looks like this)
# ----------------------------------------------------------------------------------------------

def _schema(name: str, arg: str) -> dict:
    return {"name": name, "description": f"Look up {arg} for {name.replace('_', ' ')}",
            "parameters": {"type": "object", "properties": {arg: {"type": "string", "description": f"the {arg}"}},
                           "required": [arg]}}


def glaive_records(n: int = 12) -> list[dict]:
    """LLaMA-Factory's Glaive tool-call demo layout: ShareGPT `conversations` (human, function_call, observation,
    gpt) and `tools` as a JSON string; every other record answers without calling (as about half the demo does)."""
    import random

    rng = random.Random(7)
    out = []
    for k in range(n):
        name, arg = rng.choice([("get_weather", "city"), ("convert_currency", "amount"), ("search_movie", "title")])
        value = rng.choice(["Paris", "42.50", "Dune", "São Paulo"])
        convs = [{"from": "human", "value": f"Can you help with {name.replace('_', ' ')} for {value}? ({k})"}]
        if k % 2 == 0:
            convs += [{"from": "function_call", "value": json.dumps({"name": name, "arguments": {arg: value}})},
                      {"from": "observation", "value": json.dumps({"result": f"{value} -> {k * 7}", "ok": True})},
                      {"from": "gpt", "value": f"The result for {value} is {k * 7}."}]
        else:
            convs += [{"from": "gpt", "value": f"I can only {name.replace('_', ' ')}; I cannot do that ({k})."}]
        if k % 4 == 2:  # a second round
            convs += [{"from": "human", "value": "Thanks! And once more?"},
                      {"from": "function_call", "value": json.dumps({"name": name, "arguments": {arg: "Rome"}})},
                      {"from": "observation", "value": json.dumps({"result": "Rome -> 1"})},
                      {"from": "gpt", "value": "For Rome it is 1."}]
        out.append({"conversations": convs, "tools": json.dumps([_schema(name, arg)])})
    return out


def alpaca_records(n: int = 12) -> list[dict]:
    """LLaMA-Factory's Alpaca demo layout: instruction, input (often empty), output; some with a system prompt
    and a history of earlier rounds."""
    out = []
    for k in range(n):
        r = {"instruction": f"Give {k + 2} words that rhyme with {['cat', 'light', 'blue'][k % 3]}.",
             "input": "" if k % 2 else f"Use plain words ({k}).",
             "output": " ".join(["hat", "mat", "bright", "true", "flat"][: (k % 5) + 1]) + f" ({k})"}
        if k % 3 == 1:
            r["system"] = "You are a concise assistant."
        if k % 4 == 3:
            r["history"] = [[f"What is {k} + {k}?", f"{2 * k}."], ["And doubled?", f"{4 * k}."]]
        out.append(r)
    return out


def multi_turn_records(n: int = 8) -> list[dict]:
    """`messages` with a system prompt and 2-4 rounds (some replies with non-ASCII text)."""
    out = []
    for k in range(n):
        msgs = [{"role": "system", "content": f"You are assistant number {k}. Answer briefly."}]
        for r in range(2 + k % 3):
            msgs += [{"role": "user", "content": f"Question {r} of record {k}: what is {r} squared?"},
                     {"role": "assistant", "content": f"{r} squared is {r * r}." + (" Très bien — 好的." if r % 2 else "")}]
        out.append({"messages": msgs})
    return out
