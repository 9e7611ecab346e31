"""main.py's settings checked before it imports torch and transformers, so a typo fails in about a second.

    python main.py --model_name_or_path /tmp/tiny-llama3 --train_file /tmp/tiny-tok --output_dir /tmp/o --pack_los
    # error: main.py: unrecognized arguments ['--pack_los'] ...   (~1 s; importing transformers' TrainingArguments
    # alone takes ~10 s: torch, peft, bitsandbytes)

    from longsft.train.early_checks import early_problems
    early_problems(["--max_steps", "0", "--output_dir", "/tmp/o"])   # ['--max_steps 0 trains nothing: ...', ...]

The same checks as the full start-up check (arguments.checked_settings: flag names, the config file, values,
the DeepSpeed config, sequence parallelism, required flags, paths, the model folder, the output folder), on a
parser with HfArgumentParser's option strings and value counts built from our dataclasses and from transformers'
TrainingArguments as its source declares it (setting_types.py), without importing either. It reports only what the
full check would report too: where the source cannot be read, or a default is not a literal this check can use,
it defers to the full check, which runs right after the imports anyway.
"""

from __future__ import annotations

from longsft.train.arguments import OUR_CLASSES, checked_settings
from longsft.train.setting_types import dataclass_specs, lenient_parser, training_argument_specs
from longsft.train.settings import read_settings


def early_problems(argv: list[str]) -> list[str]:
    """main.py's start-up problems of argv found without torch / transformers ([]: none found, or the full check
    must decide). Unknown flags and config keys raise SystemExit, as in the full check."""
    training = training_argument_specs()
    if training is None or "-h" in argv or "--help" in argv:  # --help: the full parser prints it
        return []
    specs = [s for cls in OUR_CLASSES for s in dataclass_specs(cls)] + training
    parser = lenient_parser(specs)
    config, flags, problems, _ = read_settings(argv, None, parser, specs=specs)  # notes: logged by the full check
    try:
        _, found = checked_settings(argv, parser, (config, flags, problems, []), check_start=True)
    except (TypeError, ValueError):  # a value this parser holds as text or a default it could not read
        return []
    return found


def check_early(argv: list[str]) -> None:
    """SystemExit naming every problem early_problems finds (main.py's message), else nothing."""
    problems = early_problems(list(argv))
    if problems:
        raise SystemExit("main.py cannot start:\n  - " + "\n  - ".join(problems))
