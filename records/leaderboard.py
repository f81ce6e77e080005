"""
The leaderboard: one table per track, fastest first, from the record folders whose README has a results block
(records/RULES.md) and which records/verify.py accepts, each below the records whose runs started before its own
(rule 3; a copy left out), a record timed beside the one it replaces on that one's clock, the calibration the track's
target comes from as its baseline.
Prints the tables, or rewrites the block between `<!-- leaderboard -->` and `<!-- /leaderboard -->` in README.md
(--write), or checks that it is current (--check).

    python records/leaderboard.py [--write | --check]
"""
import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import verify  # records/verify.py

BOARD = ("8gpu", "1gpu", "cpu")  # the tracks shown, in this order (not the smoke test's)
BEGIN, END = "<!-- leaderboard -->", "<!-- /leaderboard -->"
HERE = Path(__file__).resolve().parent


def entries(records):
    """The record folders with a results block that verify.py accepts -> [dict(track, kind, summary, configuration,
    replaces, what, date, folder, time)], each after the record it replaces; the others are named on stderr and left
    out."""
    found = []
    for folder in sorted(p for p in records.iterdir() if (p / "README.md").exists()):
        try:
            text = (folder / "README.md").read_text()
        except OSError as e:  # a folder in its place, no right to read it: one record, not the board
            print(f"left out {folder.name}: {verify.unreadable(folder, e)}", file=sys.stderr)
            continue
        head = verify.KIND.search(verify.readme_block(text) or "")
        if head and head[1] in BOARD:
            if head[2] == "calibration" and Path(verify.TRACKS[head[1]]["target_from"]).name != folder.name:
                print(f"left out {folder.name}: a calibration that is not the one the {head[1]} track's target comes "
                      f"from (verify.TRACKS)", file=sys.stderr)
                continue
            if problems := verify.verify(folder):
                print(f"left out {folder.name}: {problems[0]}", file=sys.stderr)
                continue
            what = re.search(r"^What changed: (.*)$", text, re.M)
            runs, beside = verify.load_runs(folder), verify.load_runs(folder / "beside")
            found.append(dict(track=head[1], kind=head[2], summary=verify.summary(runs, head[1], beside),
                              configuration=verify.configuration(runs[0]), code=runs[0]["sources"],
                              replaces=verify.configuration(beside[0]) if beside else None,
                              replaces_code=beside[0]["sources"] if beside else None,
                              attempt_logged=runs[0]["attempt"] is not None,
                              what=what[1] if what else "", date=folder.name[:10], folder=folder,
                              started=started(runs[0]), identity=identity(runs)))
    return scaled(sorted(originals(found), key=lambda e: (e["started"], e["folder"].name)))


def identity(runs):
    """What tells one attempt's runs from another's: each run's machine, start time and folder (logs before train.py
    wrote the start time and host: None, told apart by their folders alone)."""
    if not all("started" in r["config"] and "host" in r["config"].get("devices", {}) for r in runs):
        return None
    return sorted((r["config"]["devices"]["host"], r["config"]["started"], r["config"]["args"]["out"]) for r in runs)


def originals(found):
    """Of folders holding the same runs (a copy), the one git added first; where git cannot tell (none committed, or
    in one commit), none of them."""
    def added(folder):  # the time of the commit that added it; inf: not in this repository's history
        when = verify.git("log", "--diff-filter=A", "--format=%ct", "--", str(folder)).stdout.split()
        return int(when[-1]) if when else float("inf")
    kept = []
    for e in found:
        twins = [t for t in found if t is not e and e["identity"] is not None and t["identity"] == e["identity"]]
        if twins and not added(e["folder"]) < min(added(t["folder"]) for t in twins):  # a tie, or inf: none
            print(f"left out {e['folder'].name}: its runs are also those of "
                  f"{', '.join(t['folder'].name for t in twins)}: one folder per attempt, the one git added first",
                  file=sys.stderr)
            continue
        kept.append(e)
    return kept


def started(run):
    """When a record's first run started (config.json; logs before 2026-12-05: its commit's time), which orders the
    records, not the date a folder's name gives: rule 3 compares each with those before it."""
    commit = run["config"].get("git_commit")
    when = run["config"].get("started") or (verify.git("show", "-s", "--format=%cI", commit).stdout.strip()
                                            if commit else "")
    return datetime.datetime.fromisoformat(when).timestamp() if when else 0.0  # any time zone


def same_configuration(a, b):
    """Two runs' flags agree where both have them (a flag added to train.py since the older run is not in its
    config.json), but the stopping rule (speedrun.sh's STOP and EVERY): the runs beside a record share its rule
    (verify.py), which their ratio is measured under, whatever the rule of the record they are."""
    return all(a[k] == b[k] for k in a.keys() & b.keys() if k not in verify.STOPPING)


def of_configuration(e, records):
    """The records among `records` whose configuration e's beside/ runs are: the same flags and the code they ran
    (speedrun.sh trains them at their record's commit; a record of faster code keeps its predecessor's flags). Up to
    the eighth CPU record the runs beside trained on the candidate's code: those (logs from before attempt.json) match
    on the flags alone."""
    same = [r for r in records if r is not e and r["track"] == e["track"] and r["kind"] == "record"
            and same_configuration(r["configuration"], e["replaces"])]
    older = e["replaces_code"] == e["code"] and not e["attempt_logged"]
    return [r for r in same if r["code"] == e["replaces_code"]] or (same if older else [])


def scaled(found):
    """Each entry's time on the board: a record with runs beside it (beside/) takes the board's time of the record
    whose configuration those runs are, times the ratio of the two on its own machine, so that machines of other
    speeds race on one clock, that of the first record of the chain (records/RULES.md); the others keep their
    measured time. An entry whose beside/ runs are of no record on the board, or faster than it, is left out."""
    kept, waiting = [], found
    while waiting:  # a record is placed after the one it replaces, which may bear the same date
        pending, waiting = waiting, []
        for e in pending:
            wanted = of_configuration(e, found) if e["replaces"] else []
            replaced = [r for r in kept if any(r is w for w in wanted)]
            if e["replaces"] and not replaced:
                waiting.append(e)  # the record its runs beside are is not placed yet
                continue
            e["time"] = e["summary"]["ratio"] * replaced[-1]["time"] if replaced else e["summary"]["time"]
            best = min((r["time"] for r in kept if r["track"] == e["track"] and r["kind"] == "record"), default=None)
            if e["kind"] == "record" and best is not None and e["time"] >= best:  # rule 3: below the current record's
                beside = f" ({e['summary']['ratio']:.3f}x its runs beside)" if replaced else ""
                print(f"left out {e['folder'].name}: {e['time'] / 60:.2f} min on the board's clock{beside}, not below "
                      f"the current record's {best / 60:.2f}", file=sys.stderr)
                continue
            kept.append(e)
        if len(waiting) == len(pending):
            break
    for e in waiting:
        print(f"left out {e['folder'].name}: its beside/ runs have the flags of no record on the board (run them "
              f"with the current record's configuration: speedrun.sh BESIDE=1)", file=sys.stderr)
    return kept


def table(track, rows, readme_dir):
    """One track's markdown: a line naming it and its target, then its rows by time (a calibration is the
    baseline, not ranked)."""
    t = verify.TRACKS[track]
    goal = "not measured yet" if t["target"] is None else \
        f"{'<=' if t['metric'] in verify.LOWER_IS_BETTER else '>='} {t['target']}"
    lines = [f"**{track}**: {t['title']}; target {t['metric']} {goal} ({t['target_from']})", ""]
    if not rows:
        return lines + ["No record yet."]
    lines += [f"| rank | time | on its machine | {t['metric']} | what changed | date | record |", "|---" * 7 + "|"]
    rank = 0
    for e in sorted(rows, key=lambda e: e["time"]):
        rank += e["kind"] == "record"
        s, link = e["summary"], os.path.relpath(e["folder"], readme_dir)
        measured = "-" if s["ratio"] is None else \
            f"{s['time'] / 60:.2f} min = {s['ratio']:.3f} x {s['beside_time'] / 60:.2f} beside"
        lines.append(f"| {rank if e['kind'] == 'record' else 'baseline'} | {e['time'] / 60:.2f} min | {measured} | "
                     f"{s['mean']:.4f} +- {s['sd']:.4f} | {e['what']} | {e['date']} | [{e['folder'].name}]({link}) |")
    return lines


def leaderboard(records, readme_dir):
    found = entries(records)
    lines = []
    for track in BOARD:
        lines += table(track, [e for e in found if e["track"] == track], readme_dir) + [""]
    return "\n".join(lines).rstrip("\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --wr would be --write: a typo rewrites the README
    p.add_argument("--write", action="store_true", help="rewrite the leaderboard block of --readme")
    p.add_argument("--check", action="store_true", help="exit 1 when the block of --readme is not current")
    p.add_argument("--records", type=verify.path_arg, default=HERE, help="the folder of record folders")
    p.add_argument("--readme", type=verify.path_arg, default=HERE.parent / "README.md")
    args = p.parse_args(argv)
    # before the board, which verifies every record: a folder of none would write "No record yet" over the rows
    if not args.records.is_dir():
        p.error(f"--records {args.records}: no such folder; pass the folder of record folders, e.g. records")
    if not any(re.match(r"\d{4}-\d{2}-\d{2}_", r.name) and (r / "README.md").exists() for r in args.records.iterdir()):
        p.error(f"--records {args.records}: holds no record folder (<date>_<name>/README.md, records/RULES.md); pass "
                f"the folder of record folders, e.g. records")
    if (args.write or args.check) and not args.readme.is_file():  # (printed, the board only links from its folder)
        p.error(f"--readme {args.readme}: no such file; pass the README whose leaderboard block to write or check")
    if args.write and not os.access(args.readme, os.W_OK):  # access(2): a read-only mount too, even for root
        p.error(f"--readme {args.readme}: cannot be written; pass a copy you can write, or make it writable")
    if args.write or args.check:
        text = args.readme.read_text()
        if (old := verify.readme_block(text, BEGIN, END)) is None:
            sys.exit(f"{args.readme}: no {BEGIN} ... {END} markers for the leaderboard")
    board = leaderboard(args.records, args.readme.parent)
    if not (args.write or args.check):
        print(board)
        return
    current = f"{BEGIN}\n{board}\n{END}"
    if args.check and old != current:
        sys.exit(f"{args.readme}: the leaderboard is not current; run python records/leaderboard.py --write")
    if args.check:
        print(f"ok {args.readme}: the leaderboard is current")
    if args.write:
        args.readme.write_text(text.replace(old, current, 1))  # the first: the block found


if __name__ == "__main__":
    main()
