"""Checkpoints and the output folder: which saves are complete, which folders are ours, what may be deleted.

    from longsft.train.checkpoints import choose_checkpoint, write_marker, rotate_own_checkpoints
    path, skipped = choose_checkpoint("runs/x")   # newest complete checkpoint-N, and why newer ones were skipped

A folder main.py saves (`OUTPUT_DIR/checkpoint-N` during training, `OUTPUT_DIR` itself at the end) holds
`save_complete.json`: written with "complete": false before the save starts and rewritten "complete": true
last, after every rank wrote its files (the trainer waits for all ranks first); both through a temp file and a
rename, so a kill at any moment leaves a folder that is either visibly incomplete or whole. The marker names
the run (`run_id`, kept by a resumed run), the step and, in OUTPUT_DIR, the entries the runs wrote there
(`outputs`). From it:

  - `--resume_from_checkpoint true` (or yes) takes the newest checkpoint-N with a marker (`choose_checkpoint`);
    newer folders without one (a save cut short, or another program's checkpoint) are skipped and named; with no
    complete one (a requeued job's first submission) the run starts from scratch and says so.
    `--resume_from_checkpoint N` (a number, as GLM-Edge's finetune.py takes it) is OUTPUT_DIR/checkpoint-N,
    checked as a path given there is; a path or number that is not there is an error.
  - a resume continues the data exactly where the checkpoint stopped, or is refused (`resume_order_problems`):
    the items per optimizer step and the data order must be those of the checkpoint's run (its train_settings.json,
    copied into every checkpoint); ranks, sequence parallelism, per-device batch and accumulation may be split
    differently.
  - `--save_total_limit` deletes only checkpoints whose marker has this run's run_id (`rotate_own_checkpoints`):
    never a checkpoint-* folder another run or the user put in OUTPUT_DIR; and a resumed run is refused when
    it could save into such a folder (`others_ahead`).
  - a run resumed after it finished (OUTPUT_DIR's marker is complete at the planned last step) does nothing.
  - a new run (not a resume) starts only in a new or empty OUTPUT_DIR, or one holding nothing but an earlier
    main.py run's outputs and no checkpoints (`output_dir_problems`); a resume (also from another folder's
    checkpoint) only in one holding nothing but main.py runs' outputs (a final save cut short included: what
    appeared after the run started, `started_with` in the marker) and checkpoint-* folders; OUTPUT_DIR is never
    the model folder, and must be writable.
  - one run at a time: `OutputLock` (OUTPUT_DIR/.main.lock, an flock the kernel drops when the holder dies).

Needs no torch (main.py checks settings with it before anything heavy is imported).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

from longsft.atomic_dir import write_json_atomic

MARKER = "save_complete.json"
SETTINGS_FILE = "train_settings.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")  # a file being written through a rename (another rank's)
LOCK_FILE = ".main.lock"  # held by the main.py run writing the folder (lock_output_dir)
logger = logging.getLogger("longsft.train")


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


# ----------------------------------------------------------------------------------------------
# The completion marker
# ----------------------------------------------------------------------------------------------

def write_marker(folder: str | os.PathLike, **info) -> Path:
    """Mark `folder` complete (call it when everything else in it is written, on one process)."""
    path = Path(folder) / MARKER
    write_json_atomic(path, {"complete": True, **info})
    return path


def read_raw_marker(folder: str | os.PathLike) -> Optional[dict]:
    """The marker as written (complete or in progress), or None."""
    try:
        m = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def read_marker(folder: str | os.PathLike) -> Optional[dict]:
    """The marker of a complete save, or None (no marker, unreadable, or marked in progress)."""
    m = read_raw_marker(folder)
    return m if m and m.get("complete") is True else None


def mark_in_progress(folder: str | os.PathLike, **info) -> None:
    """A save into `folder` starts: until write_marker, it does not look complete. The marker names the run
    (`info`), so a save cut short is still known as ours; an earlier marker's fields (`outputs`) are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / MARKER, {**(read_raw_marker(folder) or {}), **info, "complete": False})


# ----------------------------------------------------------------------------------------------
# Checkpoints: the newest complete one, and rotation of this run's own
# ----------------------------------------------------------------------------------------------

def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint-N folders in output_dir, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def checkpoint_problem(folder: str | os.PathLike) -> Optional[str]:
    """Why `folder` is not a complete checkpoint of main.py, or None."""
    folder = Path(folder)
    has_state = (folder / TRAINER_STATE).is_file()
    marker = read_raw_marker(folder)
    if marker is not None and marker.get("complete") is True:
        return None if has_state else f"{MARKER} present but no {TRAINER_STATE} (files were removed from it)"
    if marker is not None:
        return f"incomplete: its save was interrupted ({MARKER} marks it in progress)"
    if not has_state:
        return f"incomplete: no {TRAINER_STATE} and no {MARKER} (its save was interrupted)"
    return (f"no {MARKER}: its save was interrupted or another program wrote it (pass its path to "
            f"--resume_from_checkpoint to use it anyway)")


def choose_checkpoint(output_dir: str | os.PathLike) -> tuple[Optional[Path], list[tuple[str, str]]]:
    """(newest complete checkpoint or None, [(name, why skipped)] for the newer ones, newest first)."""
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        why = checkpoint_problem(path)
        if why is None:
            return path, skipped
        skipped.append((path.name, why))
    return None, skipped


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the files under folder (what saving it again needs)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def checkpoint_step(folder: str | os.PathLike) -> Optional[int]:
    try:
        return int(json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def others_ahead(output_dir: str | os.PathLike, after: int, upto: int, run_id: Optional[str]) -> list[str]:
    """Checkpoints in (after, upto] that a run `run_id` resumed at step `after` could save into but that are not
    its own: another run's complete ones, or whole-looking ones without a marker (another program's)."""
    found = []
    for step, path in list_checkpoints(output_dir):
        if after < step <= upto:
            m = read_raw_marker(path)
            if (m is not None and m.get("run_id") != run_id and m.get("complete") is True) or \
                    (m is None and (path / TRAINER_STATE).is_file()):
                found.append(path.name)
    return found


def rotate_own_checkpoints(output_dir: str | os.PathLike, run_id: str, limit: Optional[int],
                           keep: tuple = (), keep_newest: bool = True) -> list[str]:
    """Delete the oldest checkpoints of run `run_id` beyond `limit` (transformers' --save_total_limit rule: the
    newest and the `keep` ones (best model) stay). Checkpoints of other runs, or without a marker, are never
    touched. Returns the names deleted."""
    if not limit or limit <= 0:
        return []
    own = [p for _, p in list_checkpoints(output_dir) if (read_marker(p) or {}).get("run_id") == run_id]
    protected = {Path(k).resolve() for k in keep if k}
    if keep_newest and own:
        protected.add(own[-1].resolve())
    deleted, remaining = [], len(own)
    for p in own:
        if remaining <= max(limit, len(protected)):
            break
        if p.resolve() not in protected:
            # the marker goes first: a deletion cut short leaves a folder that no longer looks complete
            (p / MARKER).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p.name)
            remaining -= 1
    return deleted


# ----------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------

def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def own_entries(output_dir: str | os.PathLike) -> set[str]:
    """The entries of output_dir that main.py runs wrote there (settings, marker, recorded outputs)."""
    d = Path(output_dir)
    marker = {}
    try:
        marker = json.loads((d / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    outputs = set(marker.get("outputs") or []) if isinstance(marker, dict) else set()
    return outputs | {SETTINGS_FILE, MARKER}


def cut_save_leftovers(output_dir: str | os.PathLike) -> set[str]:
    """Entries of output_dir that a main.py run wrote after it started and before it was cut short (its marker
    still says in progress): everything not there when the run started (`started_with`, see begin_output)."""
    d = Path(output_dir)
    m = read_raw_marker(d)
    if not m or m.get("complete") is not False or not isinstance(m.get("started_with"), list):
        return set()
    return {p.name for p in d.iterdir()} - set(m["started_with"])


def _is_our_settings(output_dir: Path) -> bool:
    try:
        s = json.loads((output_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(s, dict) and {"training", "resolved"} <= set(s)


def output_dir_problems(output_dir: str, model_dir: Optional[str], resume: bool) -> list[str]:
    """Why main.py must not write into output_dir: the model folder; a folder it may not write; for a new run a
    folder holding anything but an earlier main.py run's outputs, or checkpoints (a new run would write over them);
    for a resume (from any checkpoint, also another folder's) a folder holding anything but main.py runs' outputs
    and checkpoint-* folders (whose own rules are `others_ahead`)."""
    from longsft.atomic_dir import writable_problem

    out = Path(output_dir).expanduser().resolve()
    flag = f"--output_dir {output_dir}"
    if model_dir and Path(model_dir).expanduser().exists():
        model = Path(model_dir).expanduser().resolve()
        if _inside(out, model) or _inside(model, out):
            where = "is" if out == model else "is inside" if _inside(out, model) else "contains"
            return [f"{flag} {where} the --model_name_or_path folder {model_dir}: the run would write over the "
                    f"model it starts from; choose another --output_dir"]
    if out.exists() and not out.is_dir():
        return [f"{flag}: a file, not a folder"]
    if problem := writable_problem(out, flag):
        return [problem]
    if not out.is_dir():
        return []
    entries = sorted(p.name for p in out.iterdir() if not TEMP_RE.match(p.name) and p.name != LOCK_FILE)
    if not entries:
        return []
    ckpts = [p.name for _, p in list_checkpoints(out)]
    if ckpts and not resume:
        shown = ", ".join(ckpts[-3:])
        return [f"{flag} already holds checkpoints ({shown}{' ...' if len(ckpts) > 3 else ''}): continue that "
                f"run with --resume_from_checkpoint true, or choose a new or empty --output_dir (main.py never "
                f"writes over checkpoints of another run)"]
    ours = own_entries(out) | cut_save_leftovers(out) | set(ckpts) \
        if _is_our_settings(out) or read_raw_marker(out) is not None else set(ckpts)
    foreign = [e for e in entries if e not in ours]
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        what = "a resume writes its checkpoints and final output there too" if resume else \
            "main.py never writes over a folder's other files"
        return [f"{flag} holds files main.py did not write ({shown}): choose a new or empty --output_dir ({what})"]
    return []


# ----------------------------------------------------------------------------------------------
# One run per output folder: the lock
# ----------------------------------------------------------------------------------------------

class OutputLock:
    """`OUTPUT_DIR/.main.lock`, held by the main.py run writing OUTPUT_DIR (its global rank 0) from its start to its
    end, so a second run into the same folder stops at once instead of writing over the first one's outputs.

    The lock is an flock() on the file (the kernel drops it when the holder dies, however it dies); the file names
    the holder (host, pid, start time) for the message. Where flock is not supported, a lock file whose holder is
    dead on this host counts as stale, as for the temp-folder sweep (atomic_dir.owner_alive). An OUTPUT_DIR that
    did not exist is created for the lock and removed again on release if the run left it empty (a run that fails
    at start leaves nothing behind).

        with OutputLock("runs/x"):
            ...   # SystemExit naming the holder if another live run has it"""

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir).expanduser()
        self.path = self.dir / LOCK_FILE
        self.fd: Optional[int] = None
        self.created: list[Path] = []

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl
        import socket
        import time

        from longsft.atomic_dir import HOST, owner_alive

        missing = self.dir
        while not missing.exists() and missing != missing.parent:
            self.created.insert(0, missing)
            missing = missing.parent
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._holder())
            except OSError:  # no flock on this file system: the holder's host and pid decide
                holder = self._holder()
                if holder and owner_alive(holder.get("host"), holder.get("pid")) and holder.get("pid") != os.getpid():
                    os.close(fd)
                    self._refuse(holder)
            try:  # the file may have been removed by its holder between our open and our lock: take a new one
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"host": HOST, "pid": os.getpid(), "hostname": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            self.fd = fd
            return
        raise SystemExit(f"--output_dir {self.dir}: could not take {self.path} (other runs keep replacing it)")

    def _holder(self) -> dict:
        try:
            h = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return h if isinstance(h, dict) else {}

    def _refuse(self, holder: dict) -> None:
        self._remove_created()
        who = (f"main.py process {holder.get('pid')} on {holder.get('hostname', holder.get('host'))}, started "
               f"{holder.get('started')}") if holder.get("pid") else "another main.py run"
        raise SystemExit(f"--output_dir {self.dir} is in use by {who}: two runs into one folder would write over "
                         f"each other's outputs. Wait for it to finish, or choose another --output_dir (if no run is "
                         f"using it, delete {self.path})")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting run then takes a fresh file
        finally:
            os.close(self.fd)
            self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for d in reversed(self.created):  # innermost first; only folders this lock created and nothing filled
            try:
                d.rmdir()
            except OSError:
                break
        self.created = []


# ----------------------------------------------------------------------------------------------
# main.py: resume, a finished run, the final output
# ----------------------------------------------------------------------------------------------

def checkpoint_number(value) -> Optional[int]:
    """N when --resume_from_checkpoint is a checkpoint number (GLM-Edge's finetune.py: `600` = checkpoint-600)."""
    v = str(value).strip() if value is not None else ""
    return int(v) if v.isdigit() and int(v) > 0 else None


def numbered_checkpoint_problem(output_dir: str, value) -> Optional[str]:
    """Why --resume_from_checkpoint N names no checkpoint-N folder in output_dir, or None."""
    n = checkpoint_number(value)
    if n is None or (Path(output_dir) / f"checkpoint-{n}").is_dir():
        return None
    have = [p.name for _, p in list_checkpoints(output_dir)]
    return (f"--resume_from_checkpoint {value}: no checkpoint-{n} folder in --output_dir {output_dir} ("
            + (f"it has {', '.join(have[-5:])}" if have else "it has no checkpoint-* folders")
            + "); give one of its checkpoint numbers, true for the newest complete one, or a checkpoint path")


def resume_request(value, output_dir: Optional[str] = None) -> Optional[str]:
    """--resume_from_checkpoint: None (a new run), "latest" (true / yes) or the checkpoint folder given: a path,
    or a number N = output_dir/checkpoint-N (as GLM-Edge's finetune.py takes it; 0 = a new run)."""
    if value is None or str(value).lower() in ("", "false", "no", "0", "none"):
        return None
    if str(value).lower() in ("true", "yes", "latest"):
        return "latest"
    if checkpoint_number(value) is not None and output_dir is not None:
        problem = numbered_checkpoint_problem(output_dir, value)
        if problem:
            raise SystemExit(problem)
        return str(Path(output_dir) / f"checkpoint-{checkpoint_number(value)}")
    if not os.path.isdir(value):
        raise SystemExit(f"--resume_from_checkpoint {value}: no such folder")
    return str(value)


def resolve_resume(output_dir: str, request: Optional[str], steps: int) -> Optional[str]:
    """The checkpoint to resume from: the newest complete one for "latest" (those skipped are logged). Refused
    when the run, continued up to `steps`, could save into a checkpoint-N folder in output_dir that is not its own."""
    if request is None:
        return None
    if request != "latest":
        path, problem = Path(request), checkpoint_problem(request)
        if problem and (read_raw_marker(path) is not None or not (path / TRAINER_STATE).is_file()):
            raise SystemExit(f"--resume_from_checkpoint {request}: {problem}")
        if problem:
            logger.warning("--resume_from_checkpoint %s: %s", request, problem)
    else:
        path, skipped = choose_checkpoint(output_dir)
        for name, why in skipped:
            logger.warning("resume: skipping %s: %s", name, why)
        if path is None:  # a requeued job's first submission (GLM-Edge's finetune.py does the same)
            ahead = others_ahead(output_dir, 0, steps, None)
            if ahead:
                raise SystemExit(f"--resume_from_checkpoint true: no complete checkpoint of main.py in {output_dir}, "
                                 f"and a new run could save into {', '.join(ahead)}, which another program wrote: "
                                 f"move them out of --output_dir, or pass a checkpoint path")
            logger.warning("--resume_from_checkpoint true: no checkpoint found in %s, starting from scratch",
                           output_dir)
            return None
        logger.info("resuming from %s (step %s)%s", path, checkpoint_step(path),
                    f"; skipped {len(skipped)} newer incomplete one(s)" if skipped else "")
    step = checkpoint_step(path) or 0
    ahead = others_ahead(output_dir, step, steps, (read_raw_marker(path) or {}).get("run_id"))
    if ahead:
        raise SystemExit(f"--output_dir {output_dir}: {', '.join(ahead)} belong to another run or program, and "
                         f"this run (from step {step} to {steps}) could save into them: move them out of "
                         f"--output_dir (main.py never writes over another run's checkpoint)")
    return str(path)


def saved_settings(checkpoint: str | os.PathLike) -> Optional[dict]:
    """train_settings.json of the run a checkpoint belongs to: the copy saved in the checkpoint, else the one in its
    parent folder (checkpoints of earlier versions), or None."""
    for path in (Path(checkpoint) / SETTINGS_FILE, Path(checkpoint).parent / SETTINGS_FILE):
        try:
            s = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(s, dict) and isinstance(s.get("resolved"), dict):
            return s
    return None


def _step_recipe(resolved: dict, training: dict) -> str:
    return (f"{resolved.get('data_parallel_size')} data-parallel rank(s) x "
            f"{training.get('per_device_train_batch_size')} per device x "
            f"{training.get('gradient_accumulation_steps')} accumulation; {resolved.get('world_size')} "
            f"rank(s), sequence_parallel_size {resolved.get('sequence_parallel_size')}")


def resume_order_problems(checkpoint: str, settings: dict) -> Optional[list[str]]:
    """Why resuming `checkpoint` with `settings` (this run's train_settings.json content) would not continue the
    data exactly where it stopped ([] when it would; None when the resumed run's settings are unknown).

    transformers skips (step % steps per epoch) x accumulation micro-batches of every rank, i.e. step x (items per
    optimizer step) items: exact whenever the items per step (data-parallel ranks x per-device batch x accumulation)
    and the item order are the run's own, however ranks, sequence parallelism, per-device batch and accumulation are
    split. Anything else would skip or repeat data silently (issue: SP 2 -> SP 1 on 2 ranks skipped 10 of 28 packs)."""
    saved = saved_settings(checkpoint)
    if saved is None:
        return None
    old, new = saved["resolved"], settings["resolved"]
    unit = "packs" if new.get("data_order", {}).get("batch_method") == "pack" else "samples"
    problems = []
    if old.get("global_batch") is not None and old["global_batch"] != new["global_batch"]:
        step = checkpoint_step(checkpoint) or 0
        problems.append(
            f"this run takes {new['global_batch']} {unit} per optimizer step ({_step_recipe(new, settings['training'])}),"
            f" the run it resumes took {old['global_batch']} ({_step_recipe(old, saved.get('training', {}))}): from "
            f"step {step} it would start at item {step * new['global_batch']:,} instead of "
            f"{step * old['global_batch']:,}, so data would be skipped or repeated. Resume with settings that give "
            f"{old['global_batch']} {unit} per step (ranks / sequence_parallel_size x per_device_train_batch_size x "
            f"gradient_accumulation_steps), or start a new run")
    before, now = old.get("data_order") or {}, new.get("data_order") or {}
    names = {"batch_method": "--batch_method", "items": "the number of training items",
             "shuffle_seed": "the shuffle seed (--data_seed, else --seed)", "sha256": "the data's order"}
    for key, name in names.items():
        if key in before and key in now and before[key] != now[key]:
            shown = (f"{before[key]} -> {now[key]}" if key != "sha256" else
                     "the dataset or its packs changed (pre_tokenize.py / sort_and_group.py ran again)")
            problems.append(f"{name} differs from the run it resumes ({shown}): its data order is not this run's; "
                            f"resume with the run's own data and settings, or start a new run")
    return problems


def finished_output(output_dir: str, steps: int) -> Optional[dict]:
    """output_dir's marker if it holds the complete final output of a run that reached `steps` steps."""
    done = read_marker(output_dir)
    if done and done.get("kind") == "final" and int(done.get("global_step", -1)) >= steps:
        return done
    return None


def begin_output(output_dir: str) -> set[str]:
    """Before a run writes output_dir (one process): its final output no longer counts as complete, and the marker
    records what was there (`started_with`: what appears later is this run's, even if it is cut short). Returns
    the entries there now that are not main.py runs' own, which finish_output does not claim."""
    os.makedirs(output_dir, exist_ok=True)
    now = {p.name for p in Path(output_dir).iterdir() if p.name != MARKER}
    ours = own_entries(output_dir) | cut_save_leftovers(output_dir)
    mark_in_progress(output_dir, kind="final", started_with=sorted(now))
    return now - ours


def finish_output(output_dir: str, before: set[str], **info) -> None:
    """After every rank saved the final output (one process): mark output_dir complete, with the entries main.py
    runs wrote there (an earlier run's recorded ones and this run's new ones; never checkpoints)."""
    out = Path(output_dir)
    now = {p.name for p in out.iterdir()}
    outputs = (own_entries(out) & now) | (now - before)
    outputs = sorted(e for e in outputs if not CHECKPOINT_RE.match(e) and e != MARKER and not e.startswith("."))
    write_marker(out, **info, outputs=outputs)
