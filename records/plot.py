"""Accuracy against training minutes for groups of runs (seeds of one configuration) -> a markdown table per group
(each seed, mean +- sample sd), each run's time to a target, and a PNG of the curves.

    python records/plot.py --out curve.png baseline=runs/base-0,runs/base-1,runs/base-2 repa=runs/repa-0
    python records/plot.py --out curve.png --target 0.30 --metric object_accuracy baseline=runs/base-0

The time to the target is where a run's curve first reaches it (at or below it for FID, CMMD and DINO-MMD), linear
between its evaluations (evaluation time excluded, as on GPU); "not reached" when it does not within the run.
"""
import argparse
import json
import math
import os
import statistics

from PIL import Image, ImageDraw

from verify import LOWER_IS_BETTER  # records/verify.py

COLOURS = [(200, 30, 30), (30, 60, 200), (20, 140, 60), (150, 60, 170)]


def evaluations(run, metric):
    with open(os.path.join(run, "metrics.jsonl")) as f:  # a killed or running run may end in a torn line
        records = [json.loads(line) for line in f if line.endswith("}\n")]
    # evaluations only: a step line (it has the loss) is not a score; --metric loss would read as a higher-is-better one
    return [(r["train_time_s"] / 60, r["step"], r[metric]) for r in records if metric in r and "loss" not in r]


def time_to(target, points, lower=False):
    if lower:  # lower is better: the same crossing on the negated curve
        return time_to(-target, [(m, s, -a) for m, s, a in points])
    if points and points[0][2] >= target:  # at the first evaluation: no curve before it to interpolate on
        return points[0][0]
    for (m0, _, a0), (m1, _, a1) in zip(points, points[1:]):
        if a1 >= target:
            return m0 + (m1 - m0) * (target - a0) / (a1 - a0)  # a0 < target <= a1
    return None


def mean_sd(values):
    return f"**{statistics.mean(values):.3f}**" + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def table(name, runs, metric, target):
    print(f"\n{name} ({len(runs)} runs): {metric}\n\n| training minutes | steps | {metric} per run | mean +- sd |\n"
          "|---|---|---|---|")
    for i in range(max(map(len, runs))):  # every run's evaluations, the longest run's included
        rows = [points[i] for points in runs if i < len(points)]
        print(f"| {statistics.mean(m for m, _, _ in rows):.1f} | {', '.join(str(s) for _, s, _ in rows)} | "
              f"{', '.join(f'{a:.3f}' for _, _, a in rows)} | {mean_sd([a for _, _, a in rows])} |")
    if target is not None:
        times = [time_to(target, points, metric in LOWER_IS_BETTER) for points in runs]
        shown = ", ".join("not reached" if t is None else f"{t:.1f}" for t in times)
        print(f"\nminutes to {metric} {target}: {shown}" +
              (f" (mean {statistics.mean(times):.1f})" if None not in times else ""))


def plot(groups, metric, target, path):
    W, H, M = 640, 400, 50  # canvas and margin, pixels
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    t_max = max(m for runs in groups.values() for points in runs for m, _, _ in points)
    top = max([a for runs in groups.values() for points in runs for _, _, a in points] + [target or 0]) * 1.1 or 1
    x = lambda minutes: M + (W - 2 * M) * minutes / t_max  # noqa: E731
    y = lambda acc: H - M - (H - 2 * M) * acc / top  # noqa: E731
    d.line([(M, M), (M, H - M), (W - M, H - M)], fill="black")
    for i in range(5):
        d.line([(M - 4, y(top * i / 5)), (W - M, y(top * i / 5))], fill=(220, 220, 220))
        d.text((8, y(top * i / 5) - 6), f"{top * i / 5:.2f}", fill="black")
    for minutes in sorted({round(m) for runs in groups.values() for points in runs for m, _, _ in points}):
        d.text((x(minutes) - 6, H - M + 8), f"{minutes}", fill="black")
    d.text((W // 2 - 110, H - 20), f"training minutes: {metric}", fill="black")
    if target is not None:
        d.line([(M, y(target)), (W - M, y(target))], fill=(120, 120, 120))
    for k, (name, runs) in enumerate(groups.items()):
        colour = COLOURS[k % len(COLOURS)]  # more groups than colours: repeated, each curve still named
        for points in runs:
            d.line([(x(m), y(a)) for m, _, a in points], fill=colour, width=1)
        mean = [(x(statistics.mean(p[i][0] for p in runs)), y(statistics.mean(p[i][2] for p in runs)))
                for i in range(min(map(len, runs)))]
        d.line(mean, fill=colour, width=3)
        d.text((mean[-1][0] - 80, mean[-1][1] - 16), name, fill=colour)
    img.save(path)


def finite(text):
    """--target's type: nan is never reached, inf never or always."""
    value = float(text)  # not a number: argparse's "invalid finite value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --ta would be --target, a typo taken silently
    p.add_argument("groups", nargs="+", help="name=run,run,... (the run folders of one configuration's seeds)")
    p.add_argument("--metric", default="object_accuracy", help="an evaluation key of metrics.jsonl")
    p.add_argument("--target", type=finite, help="print each run's training minutes to this value")
    p.add_argument("--out", help="the PNG to write")
    args = p.parse_args()
    if args.out is not None and (os.path.exists(args.out) or not args.out.lower().endswith(".png")):  # "" too
        p.error(f"--out {args.out}: " + ("exists; write another file" if os.path.exists(args.out) else
                                         "must end in .png"))
    if args.out and not os.path.isdir(os.path.dirname(args.out) or "."):  # before the work, not after it
        p.error(f"--out {args.out}: no folder {os.path.dirname(args.out)} to write it in; make it first")
    if args.out and not os.access(os.path.dirname(args.out) or ".", os.W_OK):  # a read-only mount too, even for root
        p.error(f"--out {args.out}: its folder cannot be written; write it in another")
    groups = {}
    for group in args.groups:
        name, _, runs = group.partition("=")  # a name has no "=", a run folder may (runs/lr=1e-3)
        if "=" not in group or all(os.path.isdir(run) for run in group.split(",")):  # no name: the runs themselves
            name, runs = group, group
        runs = runs.split(",")
        if "" in runs:  # "" would read the current folder
            p.error(f"{group!r}: an empty run folder; pass name=run,run,... or run,run,... with none empty")
        if name in groups:
            p.error(f"two groups named {name!r}: name each group once (name=run,run,...)")
        if missing := [run for run in runs if not os.path.exists(os.path.join(run, "metrics.jsonl"))]:
            p.error(f"{', '.join(missing)}: no metrics.jsonl there (a run folder of train.py)" +
                    ("" if name == group else f"; from the argument {group}, read as name=run,run,..."))
        groups[name] = [evaluations(run, args.metric) for run in runs]
        for run, points in zip(runs, groups[name]):
            if not points:
                p.error(f"{run}: no evaluation of --metric {args.metric} in its metrics.jsonl (an evaluation's key, "
                        f"e.g. object_accuracy or fid; not a step line's)")
    for name, runs in groups.items():
        table(name, runs, args.metric, args.target)
    if args.out:
        plot(groups, args.metric, args.target, args.out)


if __name__ == "__main__":
    main()
