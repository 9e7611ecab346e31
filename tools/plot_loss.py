"""Plot the training (and validation) loss of a run from its `trainer_state.json`.

    python tools/plot_loss.py --run_dir output/glm4/longwriter                  # -> output/glm4/longwriter/loss.png
    python tools/plot_loss.py --run_dir quickstart_out/run --output /tmp/loss.png

`--run_dir` is a training output folder (main.py writes `trainer_state.json` there at the end) or one of its
`checkpoint-*` folders; for a run still in progress the newest checkpoint's state is used. The learning rate
goes on a second axis. Prints the first and last logged loss.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transformers import HfArgumentParser

from longsft.errors import run_cli



@dataclass
class PlotArguments:
    run_dir: str = field(metadata={"help": "Training output folder or a checkpoint-* folder in it."})
    output: Optional[str] = field(default=None, metadata={"help": "PNG to write (default: RUN_DIR/loss.png)."})
    title: Optional[str] = field(default=None, metadata={"help": "Plot title (default: the folder name)."})


def find_state(run_dir: Path) -> Path:
    """RUN_DIR/trainer_state.json, else the one of the newest checkpoint-N inside RUN_DIR."""
    direct = run_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1)
    if not ckpts:
        raise SystemExit(f"--run_dir {run_dir}: no trainer_state.json in it or in a checkpoint-* folder "
                         f"(is it a main.py output folder? logging needs --logging_steps)")
    return ckpts[-1] / "trainer_state.json"


def read_curves(state_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, value), ...], "eval_loss": [...], "learning_rate": [...]} from log_history."""
    history = json.loads(state_path.read_text(encoding="utf-8")).get("log_history", [])
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "learning_rate": []}
    for entry in history:
        for key in curves:
            if key in entry and "step" in entry:
                curves[key].append((int(entry["step"]), float(entry[key])))
    return curves


def plot(curves: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-o"), ("eval_loss", "-s")):
        if curves[key]:
            steps, values = zip(*curves[key])
            ax.plot(steps, values, style, markersize=3, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if curves["learning_rate"]:
        ax2 = ax.twinx()
        steps, values = zip(*curves["learning_rate"])
        ax2.plot(steps, values, ":", color="gray", label="learning rate")
        ax2.set_ylabel("learning rate", color="gray")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser(PlotArguments, allow_abbrev=False)  # exact flag names: no --prefix matching
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    run_dir = Path(args.run_dir)
    state = find_state(run_dir)
    curves = read_curves(state)
    if not curves["loss"]:
        raise SystemExit(f"{state}: no training loss logged (run with --logging_steps 1 or larger)")
    out = Path(args.output) if args.output else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, out, args.title or run_dir.resolve().name)
    (s0, l0), (s1, l1) = curves["loss"][0], curves["loss"][-1]
    print(f"[plot_loss] loss {l0:.4f} (step {s0}) -> {l1:.4f} (step {s1}); {len(curves['loss'])} points "
          f"from {state} -> {out}")
    return out


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
