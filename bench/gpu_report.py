"""The markdown of bench/bench_gpu.py's report: the method table, the goals and the profile, from its figures.

    from bench.gpu_report import TABLE, table_row, goal_lines
    lines = [*TABLE, table_row("llama", result, naive_result, peak_flops, "1 pack x 1")]
"""
from __future__ import annotations

from typing import Optional

GIB = 1024**3
GOAL_PACK_VS_NAIVE = 2.5
GOAL_MFU = 0.45


def gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


TABLE = ["| model | method | micro-batch x accumulation | steps | seconds | supervised tok/s | vs naive | token slots "
         "| padding | peak GiB | model TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def table_row(model_name: str, r: dict, base: Optional[dict], peak_rate: float, step_desc: str) -> str:
    if "error" in r:
        error = r["error"].replace("|", "/")
        return f"| {model_name} | {r['method']} | {step_desc} | - | - | {error} | - |" + " - |" * 5
    ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and "error" not in base else "-"
    steps = f"{r['steps']}" + ("" if r["steps"] == r["of_steps"] else f" of {r['of_steps']}")
    return (f"| {model_name} | {r['method']} | {step_desc} | {steps} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {ratio} | {r['slots']:,} | {1 - r['tokens'] / r['slots']:.1%} | {gib(r['peak_bytes'])} "
            f"| {r['flops_per_s'] / 1e12:.3g} | {r['flops_per_s'] / peak_rate:.1%} |")


def model_line(name: str, part: dict, what: str) -> str:
    n = part["shape"]["params"]
    size = f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    return (f"{name}: {what}: {size} parameters, {part['shape']['checkpointed']} of {part['shape']['layers']} "
            f"layers checkpointed (built in {part['init_s']:.1f} s)")


def goal_lines(res: dict, peak_rate: float, attention: list[str]) -> list[str]:
    lines = ["## Goals", "", "| goal | measured | status |", "|---|---|---|"]
    pack, base = res.get("pack"), res.get("naive")
    ok = lambda r: r is not None and "error" not in r  # noqa: E731
    if ok(pack) and ok(base):
        ratio = pack["tokens_per_s"] / base["tokens_per_s"]
        lines.append(f"| pack >= {GOAL_PACK_VS_NAIVE}x naive supervised tokens/s | {ratio:.2f}x | "
                     f"{'met' if ratio >= GOAL_PACK_VS_NAIVE else 'NOT met'} |")
    if ok(pack):
        mfu = pack["flops_per_s"] / peak_rate
        lines.append(f"| MFU of pack >= {GOAL_MFU:.0%} | {mfu:.1%} | {'met' if mfu >= GOAL_MFU else 'NOT met'} |")
    return lines + ["", "Attention that ran: " + ("; ".join(attention) or "none logged")]


def profile_lines(prof: dict, device) -> list[str]:  # device: a torch.device
    if "error" in prof:
        return ["## Profile", "", f"**profiler FAILED**: `{prof['error']}`"]
    busy = (f"; {prof['what']} busy {prof['busy_s']:.2f} s = {prof['busy_s'] / prof['wall_s']:.0%} of it"
            if device.type == "cuda" else "")
    total = max(prof["busy_s"], 1e-12)
    return [f"## Profile: {prof['steps']} Llama pack step(s), {prof['wall_s']:.2f} s wall{busy}", "",
            "| category | seconds | share |", "|---|---|---|",
            *[f"| {c} | {s:.3f} | {s / total:.1%} |" for c, s in prof["categories"].items()],
            "", f"| top {prof['what']} | calls | seconds | share |", "|---|---|---|---|",
            *[f"| `{t['name'][:100]}` | {t['calls']} | {t['seconds']:.3f} | {t['seconds'] / total:.1%} |"
              for t in prof["top"]]]
