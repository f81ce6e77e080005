"""
Check a record folder against records/RULES.md: parse each run's log, recompute the statistics and compare them with
the README's results block, check that the source in each log is that of the commit it names (or the folder's copy),
that the clock only moves forward, and that the flags, the hardware and the evaluation follow the track's rules;
the same for the runs beside it (beside/: the configuration it replaces, on its machine). Exit 1 with the reasons
otherwise.

    python records/verify.py records/<date>_<name>                              # check a record
    python records/verify.py --write --track cpu --what "..." records/<folder>  # speedrun.sh: check, then results block
    python records/verify.py --protocol cpu                                     # speedrun.sh: the track's protocol
"""
import argparse
import datetime
import hashlib
import importlib.machinery
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
P_MAX = 0.05       # a record: the one-sided t-test of its runs' metric against the target gives p below this
EVAL_SEED = 42     # eval.py's default: sample i starts from the noise of seed + i
BESIDE_START_S = 300  # a run beside a record's starts with the record's run of its seed (speedrun.sh BESIDE=1)
LOWER_IS_BETTER = ("fid", "cmmd", "dino_mmd")  # eval.FEATURE_METRICS; the accuracies are higher-is-better
# The rules of each track (records/RULES.md). The GPU tracks' target, stop and FID reference's images come from their
# calibration (`speedrun.sh --calibrate`), not yet run. gpu: torch.cuda.get_device_name of the H100 80GB SXM (the
# PCIe and NVL parts name themselves "NVIDIA H100 PCIe", "NVIDIA H100 NVL": slower, other tracks).
# periodic: the stopping checks' flags (speedrun.sh's); a CPU record's runs beside share its cadence (check_beside),
# the GPU tracks', which have none, is fixed, their sampler too (the scale their stop is read on). stop: speedrun.sh's
# default STOP, the periodic check's value at the target, from the calibration (FID of 2,048 images is biased above
# that of 10,000: the target itself stops late). budget: the calibration's (speedrun.sh --calibrate's).
GPU = dict(metric="fid", target=None, stop=None, target_from="speedrun.sh --calibrate", resolution=256, data="data/mj",
           eval_samples=10_000, steps=50, cfg_scale=3.5, gpu="NVIDIA H100 80GB HBM3", ref_images=None, min_runs=3,
           periodic=dict(eval_samples=2048, eval_every=2500, eval_ref="data/mj/ref-2k.npz", eval_minutes=[],
                         sample_steps=50, cfg_scale=3.5))
TRACKS = {
    "8gpu": dict(GPU, title="8 x H100, 256 px, FID", world=8, budget=dict(max_steps=100_000)),  # PRX part 2's
    "1gpu": dict(GPU, title="1 x H100, 256 px, smaller model, FID", world=1,
                 budget=dict(max_time=240, max_steps=1_000_000_000)),  # the time, not train.py's default steps
    "cpu": dict(title="CPU: one thread per run, two runs on 2 cores; built-in shapes, object_accuracy",
                metric="object_accuracy", target=0.416, target_from="records/2026-12-02_cpu-calibration",
                task="shapes.py",  # the file that defines the task: a record races the calibration's
                resolution=32, data="builtin", eval_samples=1024, steps=20, cfg_scale=3.0, threads=1, world=1,
                periodic=dict(eval_samples=256), budget=dict(max_time=30),
                cores=2, pairs=True, min_runs=3,  # pairs: two runs side by side, as the target was measured
                beside=True),  # VMs differ: a record runs the configuration it replaces beside it (RULES.md)
    "smoke": dict(title="smoke test: the whole path with a tiny model (speedrun.sh --smoke)", train_track="cpu",
                  metric="object_accuracy", target=-1.0, target_from="any run", resolution=32, data="builtin",
                  eval_samples=8, steps=2, cfg_scale=3.0, world=1, min_runs=2, budget=dict(max_steps=4),
                  baseline_flags={"hidden", "depth", "batch_size", "micro_batch", "log_every", "sample_steps"}),
}
# the flags speedrun.sh --calibrate gives train.py (config.json's `given`): a calibration trains the track's baseline
CALIBRATION_FLAGS = {"track", "seed", "out", "eval_every", "eval_samples", "eval_ref", "compile", "ckpt_every", "keep",
                     "max_time", "max_steps"}
TEACHER = "shapes_teacher.safetensors"  # shapes.TEACHER_FILE: the built-in REPA teacher's weights
BEGIN, END = "<!-- results: written by records/verify.py from the logs, checked by it -->", "<!-- /results -->"
HEADER = re.compile(r"^=== (\S+)\n", re.M)
STEP = re.compile(r"step (\d+)/\d+ \|.* \| train_time (\d+)ms \| step_avg ([\d.]+)ms")
EVAL = re.compile(r"eval step (\d+) \| (.*) \| train_time (\d+)ms$")
KIND, KINDS = re.compile(r"track: (\S+) \| kind: (\w+)"), ("record", "calibration")
PEAK = re.compile(r"^peak ([\d.e+-]+) FLOP/s per process", re.M)  # the machine's speed, shown beside each run
STOPPED = re.compile(r"^target \S+ \S+ reached at step (\d+): stopping$", re.M)
# The stopping rule: when a run checks for its target, on how many samples, and its budget. A record and the runs
# beside it share it (their ratio is measured under it), whatever the rule of the record those runs replay.
STOPPING = ("target", "eval_every", "eval_samples", "eval_minutes", "max_steps", "max_time")


# ----------------------------------------------------------------------------------------------------------
# Reading a log: train.py's log.txt (sources, config.json, console) and speedrun.sh's confirmation after it

def sections(text):
    """A log -> {name: body} of its `=== name` sections."""
    heads = list(HEADER.finditer(text))
    return {h[1]: text[h.end():nxt.start() if nxt else len(text)] for h, nxt in zip(heads, heads[1:] + [None])}


def timeline(console):
    """Step and eval lines in order -> [(step, train_time ms, step_avg ms or None, scores or None)]."""
    out = []
    for line in console.splitlines():
        if m := STEP.match(line):
            out.append((int(m[1]), int(m[2]), float(m[3]), None))
        elif m := EVAL.fullmatch(line):
            scores = dict(pair.rsplit(" ", 1) for pair in m[2].split(" | "))
            out.append((int(m[1]), int(m[3]), None, {k: float(v) for k, v in scores.items()}))
    return out


def parse_log(path):
    """-> a run: name, sources {file: text}, config, timeline, resumed, confirm (eval.py's JSON), attempt, peak."""
    parts = sections(path.read_text())
    if "config.json" not in parts or "confirm.json" not in parts:
        raise ValueError(f"{path.name}: needs train.py's config.json section and speedrun.sh's confirm.json after it")
    config, end = json.JSONDecoder().raw_decode(parts["config.json"])
    console = parts["config.json"][end:]
    run = dict(name=path.name, config=config, timeline=timeline(console),
               sources={n: body[:-1] for n, body in parts.items() if n.endswith(".py")},  # RunLog adds one newline
               resumed=any(n.startswith("config.resume") for n in parts), confirm=json.loads(parts["confirm.json"]),
               attempt=json.loads(parts["attempt.json"]) if "attempt.json" in parts else None,
               peak=float(m[1]) if (m := PEAK.search(console)) else None,
               stopped=int(m[1]) if (m := STOPPED.search(console)) else None)
    if not run["timeline"]:
        raise ValueError(f"{path.name}: no step or eval line with train_time")
    return run


def load_runs(folder):
    """The folder's log_<k>.txt, in the order of k; none where there is no folder."""
    return [parse_log(p) for p in sorted(folder.glob("log_*.txt"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))]


# ----------------------------------------------------------------------------------------------------------
# Checks: each returns a list of problems, empty when the rules are kept

@lru_cache(maxsize=None)
def committed_sources(commit):
    """The .py files at the root of a commit of this repository -> {name: text}; {} when the commit is not here."""
    ls = git("ls-tree", "--name-only", commit) if commit else None
    names = [n for n in ls.stdout.split() if n.endswith(".py")] if ls and ls.returncode == 0 else []
    return {n: git("show", f"{commit}:{n}").stdout for n in names}


def git(*argv, encoding="utf-8"):
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, encoding=encoding)


@lru_cache(maxsize=None)
def committed_sha256(commit, name):
    """The sha256 of a file (a binary one: the built-in teacher's weights) at a commit, or None."""
    if not commit:  # `git show :name` would read the index
        return None
    shown = git("show", f"{commit}:{name}", encoding=None)
    return hashlib.sha256(shown.stdout).hexdigest() if shown.returncode == 0 else None


@lru_cache(maxsize=None)
def unlogged_python(commit):
    """The commit's .py files that no log holds (outside the top level, tests/ and records/): code a run could import
    unseen."""
    names = git("ls-tree", "-r", "-z", "--name-only", commit).stdout.split("\0")  # as named: spaces, no quoting
    return [n for n in names if n.endswith(".py") and "/" in n and not n.startswith(("tests/", "records/"))]


@lru_cache(maxsize=None)
def installed_module(name):
    """Where the module a top-level source is named after lives outside the repository (tqdm.py: tqdm's package), or
    None: a source of that name is imported by the runs in its place."""
    module = name.removesuffix(".py")
    paths = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "records")]
    spec = importlib.machinery.PathFinder.find_spec(module, paths)
    return "built in" if module in sys.builtin_module_names else spec and spec.origin


def check_sources(run, folder):
    """Every embedded file is the commit's (git show) or the folder's copy; every .py file of the commit is there, and
    no other a run could import; no source takes the place of an installed module."""
    commit = run["config"].get("git_commit", "")
    committed = committed_sources(commit)
    if not committed:  # its sources could not be told from any other code's
        return [f"{run['name']}: names commit {commit[:8] or '(none)'}, which this repository lacks: its sources "
                f"cannot be checked (git fetch the commit)"]
    problems = [f"{run['name']}: no source of {n}, which commit {commit[:8]} has" for n in committed
                if n not in run["sources"]]
    problems += [f"{run['name']}: commit {commit[:8]} has {', '.join(unlogged_python(commit))}, Python that no log "
                 f"holds (a log holds the top-level .py files): move it into one"] if unlogged_python(commit) else []
    problems += [f"{run['name']}: its {n} takes the place of the installed module {where} in the runs' imports: "
                 f"rename it" for n in sorted(run["sources"]) if (where := installed_module(n))]
    for name, text in sorted(run["sources"].items()):
        copy = folder / name
        if text != committed.get(name) and not (copy.exists() and copy.read_text() == text):
            problems.append(f"{run['name']}: the source of {name} matches neither commit {commit[:8] or '(none)'} "
                            f"nor {copy}")
    return problems


def check_clock(run):
    """Steps and training time never go back, each step_avg is its train_time / step, and the run ends on an eval."""
    problems, (before_step, before_ms) = [], (0, 0)
    for step, ms, avg, _ in run["timeline"]:
        if step < before_step or ms < before_ms:
            problems.append(f"{run['name']}: step {step} at {ms} ms comes after step {before_step} at {before_ms} ms:"
                            f" the clock goes backwards")
        if avg is not None and abs(ms / step - avg) > 0.01 + 1 / step:
            problems.append(f"{run['name']}: step {step}: step_avg {avg}ms is not train_time / step "
                            f"({ms / step:.2f}ms)")
        before_step, before_ms = step, ms
    if run["timeline"][-1][3] is None:
        return problems + [f"{run['name']}: does not end on an evaluation"]
    return problems + check_stop(run)


def check_stop(run):
    """The run ends where train.py stops it: an evaluation that reaches its --target (the console says so after it,
    and the score shows it, to the 4 decimals printed) or the end of its budget. A log cut after an earlier
    evaluation, whose time would be shorter, shows neither."""
    args, (step, ms, _, scores) = run["config"]["args"], run["timeline"][-1]
    spent = step >= args["max_steps"] or bool(args.get("max_time")) and ms >= args["max_time"] * 60_000 - 1
    if run["stopped"] == step and args.get("target"):
        metric, value = args["target"]
        lower = metric in LOWER_IS_BETTER
        if metric not in scores or (scores[metric] > value + 5e-5 if lower else scores[metric] < value - 5e-5):
            return [f"{run['name']}: says --target {metric} {value} was reached at step {step}, where it scored "
                    f"{scores.get(metric)}"]
    elif not spent:
        return [f"{run['name']}: its last evaluation (step {step}, {ms} ms) neither reaches its --target "
                f"{args.get('target')} nor ends its budget (--max-steps {args['max_steps']}, --max-time "
                f"{args.get('max_time')}): the log ends before the run did"]
    return []


def check_run(run, track):
    """The flags, hardware and evaluation protocol of one run against the track's rules."""
    t, config, confirm = TRACKS[track], run["config"], run["confirm"]
    args, devices = config["args"], config.get("devices", {})
    rows = [  # (what, the run's, the rules')
        ("--track", args.get("track"), t.get("train_track", track)),
        ("--resolution", args["resolution"], t["resolution"]),
        ("--data", args["data"], t["data"]),
        ("--eval-data", args.get("eval_data"), None),
        ("eval captions", "short" if args["captions"] == "short" else "long", "long"),
        ("processes", config["world_size"], t["world"]),
        ("resumed", run["resumed"], False),
        ("eval samples", confirm["num_samples"], t["eval_samples"]),
        ("eval noise seed", confirm["seed"], EVAL_SEED),
        ("sampler steps", confirm["sampling"]["steps"], t["steps"]),
        ("cfg scale", confirm["sampling"]["cfg_scale"], t["cfg_scale"]),
        *[(f"eval {k} (the run's own: config.json 'sampling', eval.py's default)", confirm["sampling"].get(k),
           config["sampling"][k]) for k in ("shift", "pred", "route_ratio", "self_guidance")],  # the run's method
        ("evaluated data", confirm["data"], args["data"]),
        *[(f"the periodic check's --{k.replace('_', '-')}", args.get(k), v) for k, v in t.get("periodic", {}).items()],
        ("metrics", sorted(confirm["metrics"]), sorted({t["metric"], *confirm["metrics"]}))]
    # the built-in teacher is its commit's (logs since 2026-12-05 say which): one that had seen the held-out pairs would
    # leak them (records/2026-12-05_teacher-heldout)
    if "--repa builtin" in config.get("weights_sha256", {}):
        teacher = args.get("repa_weights") or TEACHER  # --repa-weights: a teacher committed at that path
        rows.append(("the built-in REPA teacher's sha256", config["weights_sha256"]["--repa builtin"],
                     committed_sha256(config.get("git_commit", ""), teacher)))
    if "checkpoint" in confirm:  # the final checkpoint, with the EMA weights where the run keeps them (eval.py writes
        # which since 2026-12-05; not checked before)
        rows += [("evaluated checkpoint", confirm["checkpoint"], f"step_{run['timeline'][-1][0]}"),
                 ("evaluated weights", confirm["weights"], "ema" if args.get("ema") else "model")]
    if "cores" in t:  # an x86 CPU with AVX2 (config.json: its vector units), 2 cores, one thread per run
        rows += [("CPU cores", devices.get("cores"), t["cores"]),
                 ("torch threads", devices.get("threads"), t["threads"])]
        if "cpu_flags" in devices:  # AVX2 is x86's alone, whatever name a VM gives its CPU ("Common KVM processor")
            rows.append(("CPU's AVX2", "avx2" in devices["cpu_flags"], True))
        else:  # older logs name the CPU only
            cpu = devices.get("cpu", "")
            rows.append(("CPU", cpu, cpu if re.match(r"(AMD|Intel)\b", cpu) else "an x86 CPU (AMD or Intel)"))
    if "gpu" in t:
        fid = confirm["settings"].get("fid", "")
        rows += [("GPUs", devices.get("gpus", [])[:t["world"]], [t["gpu"]] * t["world"]),
                 ("FID network", fid, fid if fid.startswith("torch-fidelity ") and "inception-v3-compat 2048" in fid
                  else "torch-fidelity's inception-v3-compat 2048"),
                 ("FID reference's images", confirm.get("ref_images"),  # the held-out images, not the file's bytes:
                  t["ref_images"] or confirm.get("ref_images"))]  # its float sums differ by machine and processes
    return [f"{run['name']}: {what} is {have!r}, the rules say {need!r}" for what, have, need in rows if have != need]


def configuration(run):
    """A run's flags but its seed and folder: what one configuration's runs share."""
    return {k: v for k, v in run["config"]["args"].items() if k not in ("seed", "out")}


def check_runs(runs, track):
    """Enough runs (in pairs where the track's go side by side), one attempt's (check_attempt), one configuration
    and one source."""
    t = TRACKS[track]
    problems = [f"{len(runs)} runs; the rules need at least {t['min_runs']}"] if len(runs) < t["min_runs"] else []
    problems += [f"{len(runs)} runs: {track} runs go in pairs, side by side as its target was measured (speedrun.sh "
                 f"runs them so): an even number"] if t.get("pairs") and len(runs) % 2 else []
    return problems + check_attempt(runs) + odd_runs(runs)


def odd_runs(runs):
    """One configuration per record: each run whose flags or sources are not those most runs share (the first run's
    on a tie), with what differs."""
    shared = [json.dumps([configuration(r), r["sources"]], sort_keys=True) for r in runs]
    key_of_common = max(shared, key=shared.count)
    common = runs[shared.index(key_of_common)]
    theirs, problems = configuration(common), []
    for run in runs:
        mine = configuration(run)
        differences = [f"--{k.replace('_', '-')} {mine.get(k)!r} (theirs {theirs.get(k)!r})"
                       for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)]
        differences += [f"the source of {name}" for name in sorted(run["sources"].keys() | common["sources"].keys())
                        if run["sources"].get(name) != common["sources"].get(name)]
        if differences:
            problems.append(f"{run['name']}: {', '.join(differences)} differ{'s' * (len(differences) == 1)} from "
                            f"{common['name']}'s, which {shared.count(key_of_common)} of the {len(runs)} runs share: "
                            f"one configuration per record")
    return problems


def check_record(runs, track, kind):
    """The runs (check_runs); a record meets the target (t-test) on the calibration's task."""
    t, problems = TRACKS[track], check_runs(runs, track)
    if kind == "calibration":
        return problems + check_calibration(runs, track)
    if t["target"] is None:
        return problems + [f"the {track} track has no target yet: its calibration comes first (--calibrate)"]
    problems += check_stopping_value(runs, track) + check_task(runs, t)
    s = summary(runs, track)
    if not (s["meets"] and s["p"] < P_MAX):
        problems.append(f"not a record: {t['metric']} mean {s['mean']:.4f} against target {t['target']}, one-sided "
                        f"p {s['p']:.3g} (needs < {P_MAX})")
    return problems


def check_calibration(runs, track):
    """A calibration trains the track's baseline (`train.py --track T` and speedrun.sh's flags, none of its own) for
    the track's fixed budget, not to a --target, in pairs where the track's runs go so (records/RULES.md). The flags
    typed: logs since 2026-12-08; the start time: since 2026-12-05."""
    t, problems = TRACKS[track], []
    for r in runs:
        args = r["config"]["args"]
        if args.get("target"):
            problems.append(f"{r['name']}: a calibration runs a fixed budget, not --target")
        problems += [f"{r['name']}: --{k.replace('_', '-')} {args.get(k)}: the {track} track's calibration trains "
                     f"--{k.replace('_', '-')} {v}" for k, v in t["budget"].items() if args.get(k) != v]
        if own := sorted(set(args.get("given", ())) - CALIBRATION_FLAGS - t.get("baseline_flags", set())):
            problems.append(f"{r['name']}: {', '.join('--' + k.replace('_', '-') for k in own)}: a calibration trains "
                            f"the track's baseline as it is (speedrun.sh --calibrate), with no flag of its own")
    if t.get("pairs"):  # side by side as speedrun.sh runs them: seeds 2k and 2k + 1 (logs with their start time)
        by_seed = {r["config"]["args"]["seed"]: r for r in runs if start_time(r)}
        for first, second in [(r, by_seed[s + 1]) for s, r in by_seed.items() if s % 2 == 0 and s + 1 in by_seed]:
            if (apart := abs((start_time(first) - start_time(second)).total_seconds())) > BESIDE_START_S:
                problems.append(f"{second['name']}: started {apart:.0f} s from {first['name']}: a calibration's runs "
                                f"go in pairs, side by side, as speedrun.sh runs them (seeds 2k and 2k + 1)")
    return problems


def check_stopping_value(runs, track):
    """A record's runs stop (--target, speedrun.sh's STOP) at the track's stop (the periodic check's reading of the
    target; the CPU track: the target) or beyond it, never short of it (records/RULES.md)."""
    t = TRACKS[track]
    stop, lower = t.get("stop") or t["target"], t["metric"] in LOWER_IS_BETTER
    return [f"{r['name']}: --target {' '.join(map(str, aim))}: the {track} track's runs stop at {t['metric']} {stop} "
            f"or beyond it (records/RULES.md: STOP may not pass the track's stop)" for r in runs
            if (aim := r["config"]["args"].get("target")) and
            (aim[0] != t["metric"] or (aim[1] > stop if lower else aim[1] < stop))]


def start_time(run):
    """When train.py started the run (config.json's `started`), or None: logs before 2026-12-05 do not say."""
    return datetime.datetime.fromisoformat(run["config"]["started"]) if "started" in run["config"] else None


def machine(run):
    """The machine a run's config.json names; without the CPU's units, which the code of older commits (the runs
    beside a record train at their own record's commit) does not log."""
    return {k: v for k, v in run["config"].get("devices", {}).items() if k != "cpu_flags"}


def check_beside(runs, beside, track, folder):
    """The runs beside a record follow the track's rules as its own do, as one attempt of another configuration (at
    its own commit) on the same machine (the devices config.json names), racing the same task, each started with the
    record's run of its seed (logs from before train.py wrote the start time: not checked). Not on a GPU track, whose
    records' own times rank them (leaderboard.py would scale them)."""
    if "gpu" in TRACKS[track]:
        return [f"beside/: the {track} track's records run nothing beside them (records/RULES.md): remove beside/"]
    problems = [f"beside/{p}" for r in beside for p in check_sources(r, folder / "beside") + check_clock(r) +
                check_run(r, track)]
    problems += [f"beside/: {p}" for p in check_runs(beside, track) + check_task(beside, TRACKS[track])]
    problems += [f"beside/: {len(beside)} runs beside the record's {len(runs)}: one beside each run, of its seed"] \
        if len(beside) != len(runs) else []
    problems += [f"{where}{r['name']}: ran on {machine(r)}, {runs[0]['name']} on {machine(runs[0])}: a record's runs "
                 f"and the runs beside them share one machine" for where, group in (("", runs[1:]), ("beside/", beside))
                 for r in group if machine(r) != machine(runs[0])]
    started = [[start_time(r) for r in group] for group in (runs, beside)]
    problems += [f"beside/{b['name']}: started {abs((x - y).total_seconds()):.0f} s from {r['name']}: a run beside a "
                 f"record runs side by side with its run of the same seed (speedrun.sh BESIDE=1)"
                 for r, b, x, y in zip(runs, beside, *started) if x and y and abs((x - y).total_seconds()) >
                 BESIDE_START_S]
    ours = runs[0]["config"]["args"]
    problems += [f"beside/{b['name']}: {k} {b['config']['args'][k]!r}, the record's runs {ours[k]!r}: the runs "
                 f"beside share its stopping rule (speedrun.sh's STOP, EVERY)" for b in beside
                 for k in STOPPING if k in ours and k in b["config"]["args"] and b["config"]["args"][k] != ours[k]]
    if beside and configuration(beside[0]) == configuration(runs[0]) and beside[0]["sources"] == runs[0]["sources"]:
        problems.append("beside/: the record's own configuration (its flags and source); beside it go the runs of the "
                        "one it replaces")
    return problems


def check_attempt(runs):
    """Every run of one attempt, none left out (rule 1), as speedrun.sh makes them: seeds 0..n-1, log_<k>.txt of seed
    k, --out <NAME>-<seed> with one NAME, as many as each log says the attempt made (logs before attempt.json: not
    checked)."""
    made = [r["attempt"]["runs"] if r["attempt"] else None for r in runs]
    if any(n is not None for n in made) and any(n != len(runs) for n in made):
        return [f"the folder holds {len(runs)} runs, whose logs say their attempt made {made}: a record holds every "
                f"run made for it (records/RULES.md)"]
    seeds = [r["config"]["args"]["seed"] for r in runs]
    logs = [re.fullmatch(r"log_(\d+)\.txt", r["name"]) for r in runs]
    outs = [re.fullmatch(r"(.*)-(\d+)", str(r["config"]["args"]["out"])) for r in runs]
    if sorted(seeds) == list(range(len(runs))) and all(
            log and out and int(log[1]) == int(out[2]) == seed and out[1] == outs[0][1]
            for log, out, seed in zip(logs, outs, seeds)):
        return []
    return [f"the runs are not one attempt's seeds 0..{len(runs) - 1} (seeds {seeds}, --out "
            f"{[r['config']['args']['out'] for r in runs]}): a record holds every run made for it (records/RULES.md),"
            f" log_<k>.txt of seed k, --out <NAME>-<k>, as speedrun.sh runs them"]


# The task is what shapes.py draws, captions and reads back, not its bytes (a refactor keeps the race): its constants,
# 64 scenes of each split and two seeds rendered at the track's resolution (argv[1]) with both captions, the
# checker's reading of each render against its own objects, the previous scene's and a noise image, and of the render
# blurred and noised twice, as generated images are, where the checker's thresholds decide; then, through the
# interfaces a run uses (data.py's open_heldout and open_loader), the held-out split's captions, renders and scores
# (the metric) and the training loader's first batches (training never draws the held-out pairs). The text encoder's
# output is left out: a run's method. Run on all the sources embedded in a log.
TASK_PROBE = """
import hashlib, sys, numpy as np, torch, shapes as s
from scipy import ndimage
side, rng = int(sys.argv[1]), np.random.default_rng(0)
h = hashlib.sha256(repr([s.COLORS, s.BACKGROUNDS, s.SHAPES, s.SIZES, s.REGIONS, s.HELDOUT_PAIRS, s.VOCAB,
                         s.MAX_COLOR_DISTANCE, s.MIN_SHAPE_IOU, s.MIN_AREA]).encode())  # the checker's thresholds
noise, previous = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8), []
for split in s.SPLITS:
    for seed in (0, 10_000):
        data = s.ShapesDataset(seed, split)
        for i in range(64):
            scene = data.scene(i)
            image = s.render(scene, side)
            h.update(image.tobytes())
            blurred = [ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
                       + rng.normal(0, sd, image.shape) for sigma, sd in ((1.0, 25), (1.5, 40))]
            pairs = [(image, scene.objects), (image, previous), (noise, scene.objects),
                     *((np.clip(x, 0, 255).round().astype(np.uint8), scene.objects) for x in blurred)]
            readings = [s.check_scene(x, objects) for x, objects in pairs]
            h.update(repr([s.long_caption(scene), s.short_caption(scene), readings]).encode())
            previous = scene.objects
import data  # the interfaces train.py and eval.py open them through: the held-out split, the training loader
for seed in (0, 1):
    held, idx = data.open_heldout("builtin", 32, "long", side, seed, s.TEXT_CONTEXT), list(range(32))
    renders = held.images(idx)
    noise_batch = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, renders.shape, dtype=np.uint8))
    scores = [held.score(x, idx) for x in (renders, renders.roll(1, 0), noise_batch)]
    h.update(renders.numpy().tobytes() + repr([held.captions(idx), scores]).encode())
    loader = data.open_loader("builtin", 8, 0, 1, seed, "long", "cpu", 1, side, s.TEXT_CONTEXT, None)
    for _ in range(2):
        batch = next(loader)
        h.update(batch["image"].numpy().tobytes() + repr(batch["caption"]).encode())
print(h.hexdigest())
"""


# The evaluation is eval.py's sampler and its averaging of the scores, fixed by the rules whatever the model: through
# the interfaces a run uses, a stand-in network on fixed text (the text encoder is a run's method) sampled with and
# without guidance and self-guidance, both predictions. Run on all the sources embedded in a log (eval.py imports
# the others).
STAND_IN = """
import hashlib, sys, types, torch, eval as ev
side = int(sys.argv[1])
class Flow(torch.nn.Module):  # a stand-in network: its output depends on x, t, the text, its mask and the route
    cfg = types.SimpleNamespace(patch_size=4)
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
    def forward(self, x, t, txt, txt_mask=None, route_ratio=0.0, route_scores=None, **unused):
        m = torch.ones(txt.shape[:2]) if txt_mask is None else txt_mask.float()
        c = (txt.float() * m[..., None]).sum((1, 2)) / m.sum(1) / txt.shape[-1]
        r = route_ratio * (0.5 if route_scores is None else route_scores.mean(1))
        tt = t[:, None, None, None]
        return self.w * x * tt + torch.tanh(x.roll(1, -1) + (c + r)[:, None, None, None]) * (1 - tt)
g = torch.Generator().manual_seed(0)  # fixed text: the text encoder is a run's method, not the evaluation
bank, lengths = torch.randn(7, 6, 16, generator=g), torch.tensor([6, 3, 5, 1, 6, 2, 4])
bank_mask, null = torch.arange(6)[None] < lengths[:, None], (torch.randn(1, 2, 16, generator=g), torch.ones(1, 2) > 0)
model, h, idx = Flow(), hashlib.sha256(), list(range(5))
class Prompts:  # held-out prompts as evaluate() reads them: the fixed text, no score of their own
    null = null
    def encode(self, indices):
        return bank[indices], bank_mask[indices]
    def score(self, images, indices):
        return {}
def sampled(shape, decode):  # both predictions, guided or not, with self-guidance
    with torch.no_grad():
        for pred in ("v", "x"):
            for cfg, guidance in ((3.0, 0.0), (1.0, 2.0), (3.0, 3.0)):
                x = ev.sample(model, bank[idx], bank_mask[idx], *null, [42 + i for i in idx], shape, steps=4,
                              cfg_scale=cfg, shift=1.0, pred=pred, route_ratio=0.25, self_guidance=guidance)
                h.update(decode(x).numpy().tobytes())
"""
# The CPU track: then evaluate() over uneven batches, scored by the held-out split's checker and the images' mean.
EVAL_PROBE = STAND_IN + """
import shapes as s
class Scored(Prompts):  # the held-out split's checker, and the images' mean: evaluate's averaging shows
    def __init__(self, split):
        self.split, self.captions = split, split.captions
    def score(self, images, indices):
        return {**self.split.score(images, indices), "pixel_mean": float(images.float().mean()) / 255}
split = s.HeldoutShapes(0, "long", side)
sampled((3, side, side), ev.to_uint8)
with torch.no_grad():
    result = ev.evaluate(model, Scored(split), 7, (3, side, side), seed=42, batch_size=3, steps=3, cfg_scale=3.0,
                         shift=1.0, pred="v", route_ratio=0.25, self_guidance=1.5)
h.update(repr(sorted((k, round(v, 6)) for k, v in result.items())).encode())
print(h.hexdigest())
"""
# The GPU tracks: latents (a fixed stand-in for the VAE decodes them), then FID as evaluate() computes it: Inception
# features (random weights in the real network: the computation shows, not the weights) streamed over uneven
# batches against a reference of fixed images, the Frechet distance (4 significant digits: its eigenvalues' round-off
# differs between BLAS libraries).
FID_PROBE = STAND_IN + """
import tempfile, numpy as np
def decode(z):  # (B, 4, 8, 8) -> uint8 (B, 3, 16, 16)
    return ev.to_uint8(torch.tanh(z[:, :3]).repeat_interleave(2, -1).repeat_interleave(2, -2))
sampled((4, 8, 8), decode)
real = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, 3, 16, 16), dtype=np.uint8))
with tempfile.TemporaryDirectory() as folder, torch.no_grad():
    weights, ref = f"{folder}/inception.pth", f"{folder}/ref.npz"
    torch.manual_seed(0)
    ev.write_random_inception_weights(weights)
    reference = ev.Metrics(None, ["fid"], fid_weights=weights)
    reference.update(real[:4])
    reference.update(real[4:])
    reference.save_reference(ref)
    metrics = ev.Metrics(ref, ["fid"], fid_weights=weights)
    result = ev.evaluate(model, Prompts(), 7, (4, 8, 8), decode, metrics, seed=42, batch_size=3, steps=3,
                         cfg_scale=3.5, shift=1.0, pred="v", route_ratio=0.25, self_guidance=1.5)
h.update(f"{result['fid']:.4g}".encode())
print(h.hexdigest())
"""


# Each probe runs in a process of its own, forked from a server that has imported the libraries the sources import
# (none of the sources), as `python -c PROBE RESOLUTION` would run in the folder but without importing torch again
# (most of a probe's time in a fresh interpreter); nothing a probe does reaches the next.
PROBE_SERVER = """
import json, os, sys, traceback
import numpy, PIL.Image, safetensors.torch, scipy.ndimage, torch, tqdm
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(job["folder"])
        for fd, name in ((0, os.devnull), (1, "stdout"), (2, "stderr")):
            os.dup2(os.open(name, os.O_RDWR | os.O_CREAT), fd)
        for name in os.listdir():  # the folder's files, not a module of the same name the libraries import
            sys.modules.pop(name.removesuffix(".py"), None)
        sys.path[0], sys.argv, code = job["folder"], ["-c", job["arg"]], 0
        torch.seed(), numpy.random.seed()  # unseeded draws differ from probe to probe, as in fresh interpreters
        try:
            exec(compile(job["probe"], "<string>", "exec"), {"__name__": "__main__"})  # exec adds the builtins
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    status = os.waitpid(pid, 0)[1]
    out, err = (open(os.path.join(job["folder"], name)).read() for name in ("stdout", "stderr"))
    print(json.dumps(dict(status=os.waitstatus_to_exitcode(status), stdout=out, stderr=err)), flush=True)
"""


@lru_cache(maxsize=None)
def probe_server():
    """The PROBE_SERVER of this process, started at its first probe; it ends when this process closes its stdin."""
    return subprocess.Popen([sys.executable, "-c", PROBE_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


@lru_cache(maxsize=None)
def fingerprint(probe, files, resolution):
    """A probe's sha256 line, run on `files` ((name, text), ...) written to a folder of their own; a probe that
    fails raises with its error (never a value compared as a hash)."""
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files:
            Path(folder, name).write_text(text)
        if probe_server().poll() is not None:  # ended (killed): a new one
            probe_server.cache_clear()
        server = probe_server()
        server.stdin.write(json.dumps(dict(folder=folder, probe=probe, arg=str(resolution))) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
    if not reply:
        raise RuntimeError(f"no fingerprint: the probe server ended (exit status {server.wait()})")
    result = json.loads(reply)
    if result["status"]:
        raise RuntimeError(f"no fingerprint: {result['stderr'].strip()[-200:]}")
    return result["stdout"].strip()


def check_task(runs, t):
    """A record races the task and the evaluation its target was measured with: the file that defines the task (the
    CPU track's shapes.py: scenes, captions, checker) draws and reads what the calibration's did (TASK_PROBE), and
    its eval.py samples and averages as the calibration's did (EVAL_PROBE); on a GPU track, once calibrated, its
    eval.py samples and computes FID as the calibration's did (FID_PROBE)."""
    fixed = "the evaluation is fixed (records/RULES.md)"
    if "task" in t:
        probes = [(TASK_PROBE, f"its {t['task']} (or data.py's way to it) draws or reads other scenes than that of "
                               f"{t['target_from']}, where the target was measured: another task; a changed task "
                               f"needs its own calibration (speedrun.sh --calibrate)"),
                  (EVAL_PROBE, f"its eval.py samples or averages otherwise than that of {t['target_from']}: {fixed}")]
    elif t["metric"] == "fid" and t["target"] is not None:
        probes = [(FID_PROBE, f"its eval.py samples or computes FID otherwise than that of {t['target_from']}: "
                              f"{fixed}")]
    else:
        return []
    files = lambda r: tuple(sorted(r["sources"].items()))  # noqa: E731  every source of a log (fingerprint's key)
    problems = []
    for probe, otherwise in probes:
        try:
            calibrated = fingerprint(probe, files(load_runs(ROOT / t["target_from"])[0]), t["resolution"])
        except RuntimeError as e:
            return [f"{t['target_from']}: {e}"]
        for r in runs:
            try:
                if fingerprint(probe, files(r), t["resolution"]) != calibrated:
                    problems.append(f"{r['name']}: {otherwise}")
            except RuntimeError as e:
                problems.append(f"{r['name']}: {e}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Statistics and the README's results block

def summary(runs, track, beside=()):
    """Times (s) and metrics of the runs -> means, sds and the one-sided t-test against the target; with the runs
    beside them, the ratio of the mean times and the two-sided paired t-test of the times, seed by seed."""
    from scipy import stats  # here: speedrun.sh's --protocol needs no scipy, whose import takes seconds
    t = TRACKS[track]
    times = [r["timeline"][-1][1] / 1000 for r in runs]
    values = [r["confirm"]["metrics"].get(t["metric"], float("nan")) for r in runs]
    lower = t["metric"] in LOWER_IS_BETTER
    test = stats.ttest_1samp(values, t["target"], alternative="less" if lower else "greater") \
        if t["target"] is not None and len(values) > 1 else None
    mean, time = statistics.mean(values), statistics.mean(times)
    beside_times = [r["timeline"][-1][1] / 1000 for r in beside]
    beside_time = statistics.mean(beside_times) if beside else None
    paired = stats.ttest_rel(times, beside_times) if len(beside) == len(runs) > 1 else None
    return dict(times=times, values=values, lower=lower, mean=mean, time=time, beside_times=beside_times,
                beside_time=beside_time, ratio=time / beside_time if beside else None,
                beside_p=float(paired.pvalue) if paired else float("nan"),
                time_sd=statistics.stdev(times) if len(times) > 1 else 0.0,
                sd=float(stats.tstd(values)) if len(values) > 1 else 0.0,  # nan where a run lacks the metric
                t=float(test.statistic) if test else float("nan"), p=float(test.pvalue) if test else float("nan"),
                meets=t["target"] is not None and (mean <= t["target"] if lower else mean >= t["target"]))


def results_block(runs, track, kind, beside=()):
    """The README's results: a header line (track, kind, metric, target), a row per run, the statistics; the runs
    beside it and their times."""
    t, s = TRACKS[track], summary(runs, track, beside)
    lines = [BEGIN, f"track: {track} | kind: {kind} | {t['metric']}, {'lower' if s['lower'] else 'higher'} is "
                    f"better | target: {t['target']}", "",
             f"| run | seed | steps | train time | {t['metric']} | commit | peak FLOP/s |", "|---" * 7 + "|"]
    for r, seconds, value in zip(runs, s["times"], s["values"]):
        lines.append(f"| [{r['name']}]({r['name']}) | {r['config']['args']['seed']} | {r['timeline'][-1][0]} | "
                     f"{seconds:.1f} s | {value:.4f} | {r['config'].get('git_commit', '')[:8]} | "
                     f"{'-' if r['peak'] is None else format(r['peak'], '.3g')} |")
    lines += ["", f"- train time: mean {s['time']:.1f} s ({s['time'] / 60:.2f} min), sd {s['time_sd']:.1f} s, "
                  f"{len(runs)} runs",
              f"- {t['metric']}: mean {s['mean']:.4f}, sd {s['sd']:.4f}; " +
              ("a calibration: its mean, rounded to 3 decimals, is the track's target" if kind == "calibration" else
               f"one-sided t-test against {t['target']}: t {s['t']:.3g}, p {s['p']:.3g} (a record needs p < {P_MAX})"
               if t["target"] is not None else "no target yet: a calibration's mean sets it")]
    if beside:
        lines.append(f"- beside/: the configuration it replaces on the same machine, {len(beside)} runs: mean "
                     f"{s['beside_time']:.1f} s ({s['beside_time'] / 60:.2f} min), times "
                     f"{', '.join(f'{x:.1f}' for x in s['beside_times'])} s; this configuration "
                     f"takes {s['ratio']:.3f}x its time (paired by seed, two-sided p {s['beside_p']:.3g})")
    if t["metric"] == "fid":
        lines.append("- FID reference's images: " + ", ".join(sorted({str(r["confirm"].get("ref_images"))
                                                                      for r in runs})))
    return "\n".join(lines + [END])


def readme_block(text, begin=BEGIN, end=END):
    """The README's block from marker `begin` to `end`, both included (by default its results block), or None."""
    start, stop = text.find(begin), text.find(end)
    return text[start:stop + len(end)] if 0 <= start < stop else None


def first_difference(readme, logs):
    for x, y in itertools.zip_longest(readme.splitlines(), logs.splitlines(), fillvalue=""):
        if x != y:
            return f"README's results say {x!r} where the logs give {y!r}"
    return "README's results block differs from the logs' (line endings)"


def verify(folder, text=None):
    """-> the problems of a record folder: empty when it follows the rules. text: its README's, in place of the
    file's (--write checks the README it would write)."""
    try:
        if text is None:
            text = (folder / "README.md").read_text() if (folder / "README.md").exists() else ""
        block = readme_block(text)
        kind = KIND.search(block or "")
        if not kind or kind[1] not in TRACKS or kind[2] not in KINDS:
            return [f"{folder}/README.md: no results block naming a track of {sorted(TRACKS)} and a kind of {KINDS} "
                    f"(records/RULES.md)"]
        track, kind = kind[1], kind[2]
        runs = load_runs(folder)
        if not runs:
            return [f"{folder}: no log_<k>.txt"]
        problems = [p for r in runs for p in check_sources(r, folder) + check_clock(r) + check_run(r, track)]
        beside = load_runs(folder / "beside")  # the configuration it replaces, run beside it on its machine
        if beside:
            problems += check_beside(runs, beside, track, folder)
        elif TRACKS[track].get("beside") and kind == "record" and any("started" in r["config"] for r in runs):
            problems.append(f"no beside/log_<k>.txt: a {track} record runs the configuration it replaces beside it, "
                            f"on its machine (BESIDE=1 bash speedrun.sh ...; records/RULES.md); logs from before "
                            f"train.py wrote the start time (every one of the record's) are exempt")
        expected = results_block(runs, track, kind, beside)
        problems += [first_difference(block, expected)] if block != expected else []
        return problems + check_record(runs, track, kind)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, OSError) as e:  # a log in another layout, or
        return [unreadable(folder, e)]  # unreadable


def unreadable(folder, e):
    """The problem of a log or README in another layout, or that cannot be read (a folder in its place, no right)."""
    if isinstance(e, OSError):
        return f"{e.filename or folder}: cannot be read: {e.strerror or e}"
    return f"{folder}: not the log layout of records/RULES.md: {type(e).__name__} {e}"


def carry_sources(runs, folder):
    """Sources that differ from the commit named in the log go into the folder, so that the record shows them.
    -> the files written."""
    written = []
    for r in runs:
        committed = committed_sources(r["config"].get("git_commit", ""))
        for name, text in r["sources"].items():
            if text != committed.get(name) and not (folder / name).exists():
                (folder / name).write_text(text)
                written.append(folder / name)
    return written


def new_readme(folder, runs, beside, track, kind, what, command):
    """The README with its results block from the logs; a new README gets a title, what changed and the command."""
    readme = folder / "README.md"
    text = readme.read_text() if readme.exists() else \
        f"# {folder.name}\n\nWhat changed: {what}\n\n    {command}\n\n{BEGIN}\n{END}\n"
    old, block = readme_block(text), results_block(runs, track, kind, beside)
    return text.replace(old, block) if old else text + "\n" + block + "\n"


def verified_write(folder, track, kind, what, command):
    """write's README, verified before it is written -> its problems; where there are any, nothing is written (a
    README's valid results block stays as it was, the sources carried for the check go)."""
    try:
        runs, beside = load_runs(folder), load_runs(folder / "beside")
        if not runs:
            return [f"{folder}: no log_<k>.txt"]
        text = new_readme(folder, runs, beside, track, kind, what, command)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, OSError) as e:
        return [unreadable(folder, e)]
    carried = carry_sources(runs, folder) + carry_sources(beside, folder / "beside")  # the copies check_sources reads
    if problems := verify(folder, text):
        for path in carried:
            path.unlink()
    else:
        (folder / "README.md").write_text(text)
    return problems


def protocol(track):
    """The track's protocol as shell assignments, for speedrun.sh."""
    t = TRACKS[track]
    values = dict(metric=t["metric"], target="" if t["target"] is None else t["target"], stop=t.get("stop") or "",
                  samples=t["eval_samples"], gpu=t.get("gpu", ""), world=t["world"],
                  steps=t["steps"], cfg=t["cfg_scale"], runs=t["min_runs"], lower=int(t["metric"] in LOWER_IS_BETTER),
                  budget=" ".join(f"--{k.replace('_', '-')} {v}" for k, v in t["budget"].items()))
    return "\n".join(f"{k}={shlex.quote(str(v))}" for k, v in values.items())


def path_arg(text):
    """argparse's type of a file or folder argument (leaderboard.py's too): "" (an unset shell variable) would be
    the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset variable?): name the file or folder")
    return Path(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --wr would be --write, a typo of another flag taken silently
    p.add_argument("folder", nargs="?", type=path_arg, help="a record folder: records/<date>_<name>")
    p.add_argument("--protocol", choices=sorted(TRACKS), help="print the track's protocol as shell variables")
    p.add_argument("--commit", action="store_true", help="print the commit the folder's runs trained at (speedrun.sh "
                   "runs a record's configuration there, beside a candidate)")
    p.add_argument("--write", action="store_true", help="write the README's results block, where the folder then "
                   "passes (speedrun.sh)")
    p.add_argument("--track", choices=sorted(TRACKS), help="with --write: the record's track")
    p.add_argument("--kind", choices=KINDS, default="record", help="with --write")
    p.add_argument("--what", default="(say what changed)", help="with --write, for a new README")
    p.add_argument("--command", default="bash speedrun.sh", help="with --write, for a new README")
    args = p.parse_args(argv)
    if args.protocol:
        print(protocol(args.protocol))
        return
    if not args.folder or (args.write and not args.track):
        p.error("pass a record folder (and --track with --write), or --protocol TRACK")
    if not args.folder.is_dir():
        p.error(f"{args.folder}: no such folder (a record folder: records/<date>_<name>)")
    if args.commit:
        try:
            commits = {r["config"].get("git_commit") for r in load_runs(args.folder)}
        except (ValueError, KeyError, TypeError, OSError) as e:
            p.error(unreadable(args.folder, e))
        if len(commits) != 1 or None in commits:
            p.error(f"{args.folder}: needs the logs (log_<k>.txt) of runs at one commit; its logs name "
                    f"{sorted(map(str, commits)) or 'none'}")
        print(commits.pop())
        return
    if problems := verified_write(args.folder, args.track, args.kind, args.what, args.command) if args.write else \
            verify(args.folder):
        print("\n".join(f"FAIL {problem}" for problem in problems))
        sys.exit(1)
    header = readme_block((args.folder / "README.md").read_text()).splitlines()[1]
    print(f"ok {args.folder}: {header}")
    track, kind = KIND.search(header).groups()
    if kind == "calibration" and (ROOT / TRACKS[track]["target_from"]).resolve() != args.folder.resolve():
        folder = args.folder.resolve()  # as TRACKS names it: from the repository's root, where it is below it
        print(calibration_note(load_runs(args.folder), track, folder.relative_to(ROOT)
                               if folder.is_relative_to(ROOT) else folder))


def calibration_note(runs, track, folder):
    """What a new calibration (`folder`) of the track sets, a commit of verify.py: the target, the mean of its
    runs' full evaluations; on a GPU track the stopping value, the mean of their last periodic checks (the scale the
    stopping rule reads), and the FID reference's images (the sha256 of the held-out images it holds)."""
    refs, metric = sorted({r["confirm"].get("ref_images") for r in runs} - {None}), TRACKS[track]["metric"]
    periodic = [[s[metric] for *_, s in r["timeline"] if s and metric in s][-1:] for r in runs]
    stop = f", stop={statistics.mean(p[0] for p in periodic):.4g}" if "stop" in TRACKS[track] and all(periodic) else ""
    return (f"its mean becomes the {track} track's target where TRACKS['{track}'] in records/verify.py says "
            f"target={round(summary(runs, track)['mean'], 3):g}{stop}, target_from='{folder}'"
            + (f", ref_images='{refs[0]}'" if refs else "") + ": commit that with the folder, then write its results "
            f"again (`python records/verify.py --write --track {track} --kind calibration {folder}`: their "
            f"header names the target; records/RULES.md)")


if __name__ == "__main__":
    main()
