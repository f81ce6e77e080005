"""Caption accuracy against training minutes, from a run's metrics.jsonl -> curve.png and a markdown table.

    python records/plot.py runs/<curve run>/metrics.jsonl records/<record>/curve.png
"""
import json
import sys

from PIL import Image, ImageDraw

evals = [r for r in map(json.loads, open(sys.argv[1])) if "caption_accuracy" in r]
print("| training minutes | step | full | colour + region |\n|---|---|---|---|")
for r in evals:
    print(f"| {r['train_time_s'] / 60:.1f} | {r['step']} | {r['caption_accuracy']:.3f} | {r['color_region_accuracy']:.3f} |")

W, H, M = 640, 400, 50  # canvas and margin, pixels
img = Image.new("RGB", (W, H), "white")
d = ImageDraw.Draw(img)
t_max = max(r["train_time_s"] for r in evals) / 60
x = lambda minutes: M + (W - 2 * M) * minutes / t_max
y = lambda acc: H - M - (H - 2 * M) * acc
d.line([(M, M), (M, H - M), (W - M, H - M)], fill="black")
for acc in (0, 0.25, 0.5, 0.75, 1.0):
    d.line([(M - 4, y(acc)), (W - M, y(acc))], fill=(220, 220, 220))
    d.text((8, y(acc) - 6), f"{acc:.2f}", fill="black")
for minutes in sorted({round(r["train_time_s"] / 60) for r in evals}):
    d.text((x(minutes) - 6, H - M + 8), f"{minutes}", fill="black")
d.text((W // 2 - 60, H - 20), "training minutes (2 CPU cores)", fill="black")
for key, colour, label in (("caption_accuracy", (200, 30, 30), "full"),
                           ("color_region_accuracy", (30, 60, 200), "colour + region")):
    points = [(x(r["train_time_s"] / 60), y(r[key])) for r in evals]
    d.line(points, fill=colour, width=2)
    for px, py in points:
        d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    d.text((points[-1][0] - 90, points[-1][1] - 16), label, fill=colour)
img.save(sys.argv[2])
