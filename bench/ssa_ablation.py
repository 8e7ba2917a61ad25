r"""Vanilla GPT vs selective attention: same seed, data, steps and size; only `ssa` differs.

  python bench/ssa_ablation.py                      # off, position, on: configs/ssa.py:ablation
  python bench/ssa_ablation.py --arms off,on --steps 300 --out /tmp/abl

Each arm is one `train.py --config configs/ssa.py:variant=ablation,ssa=<arm>` run (a separate
process, as a user would launch it) on the embedded byte-level corpus. The script then reads
every run's eval records from `<workdir>/metrics.jsonl` and prints, and writes to
`--doc` (markdown) and `--png` (validation loss curves), the validation loss / bits per byte per
eval step and the final numbers. Nothing is tuned per arm.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("off", "position", "on", "unshared")
LABELS = {"off": "vanilla GPT", "position": "SSA position term (official code)",
          "on": "SSA full, weight-shared", "unshared": "SSA full, unshared"}
COLOURS = {"off": (90, 90, 90), "position": (31, 119, 180), "on": (214, 39, 40),
           "unshared": (44, 160, 44)}


def run_arm(arm: str, workdir: str, steps: int | None) -> float:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           f"--config={os.path.join(ROOT, 'configs', 'ssa.py')}:variant=ablation,ssa={arm}",
           f"--workdir={workdir}"]
    if steps:
        cmd.append(f"--config.total_steps={steps}")
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.time() - start


def eval_curve(workdir: str) -> list[tuple[int, float, float]]:
    """[(step, eval loss, eval bits per byte)] from a run's metrics.jsonl."""
    curve = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval/loss" in record:
                curve.append((record["step"], record["eval/loss"], record["eval/bits_per_byte"]))
    if not curve:
        raise RuntimeError(f"{workdir}/metrics.jsonl has no eval records")
    return curve


def draw_png(curves: dict[str, list], path: str) -> None:
    """Validation loss vs step, one polyline per arm (PIL only: no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height, margin = 900, 560, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(s, loss) for curve in curves.values() for s, loss, _ in curve]
    max_step = max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    pad = 0.05 * (high - low or 1.0)
    low, high = low - pad, high + pad

    def xy(step, loss):
        return (margin + (width - 2 * margin) * step / max_step,
                height - margin - (height - 2 * margin) * (loss - low) / (high - low))

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i in range(6):
        value = low + (high - low) * i / 5
        y = xy(0, value)[1]
        draw.line([margin - 5, y, margin, y], fill="black")
        draw.text((8, y - 6), f"{value:.3f}", fill="black")
        step = int(max_step * i / 5)
        x = xy(step, low)[0]
        draw.line([x, height - margin, x, height - margin + 5], fill="black")
        draw.text((x - 12, height - margin + 10), str(step), fill="black")
    draw.text((width // 2 - 20, height - 25), "step", fill="black")
    draw.text((margin, 20), "validation loss (nats/byte), embedded stdlib corpus", fill="black")
    for row, (arm, curve) in enumerate(curves.items()):
        colour = COLOURS[arm]
        draw.line([xy(s, loss) for s, loss, _ in curve], fill=colour, width=3)
        y = margin + 15 + 18 * row
        draw.line([width - margin - 260, y, width - margin - 230, y], fill=colour, width=3)
        draw.text((width - margin - 225, y - 6), LABELS[arm], fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="off,position,on")
    parser.add_argument("--steps", type=int, default=None, help="override total_steps")
    parser.add_argument("--out", default="/tmp/ssa_ablation", help="parent of the workdirs")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "ssa_ablation.md"))
    parser.add_argument("--png", default=os.path.join(ROOT, "docs", "ssa_ablation.png"))
    parser.add_argument("--reuse", action="store_true",
                        help="read existing workdirs instead of training")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; allowed {ARMS}")

    seconds = {}
    for arm in arms:
        workdir = os.path.join(args.out, arm)
        if not args.reuse:
            if os.path.exists(workdir):
                raise SystemExit(f"{workdir} exists (a run there would resume): remove it or "
                                 f"pass --reuse")
            seconds[arm] = run_arm(arm, workdir, args.steps)
            print(f"trained {arm} in {seconds[arm]:.0f} s", flush=True)
    curves = {arm: eval_curve(os.path.join(args.out, arm)) for arm in arms}

    import jax
    steps = [s for s, _, _ in curves[arms[0]]]
    header = "| step | " + " | ".join(f"{LABELS[a]}: loss / bpb" for a in arms) + " |"
    lines = [header, "|" + "---|" * (len(arms) + 1)]
    for i, step in enumerate(steps):
        cells = [f"{curves[a][i][1]:.4f} / {curves[a][i][2]:.4f}" for a in arms]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    base = curves[arms[0]][-1][1]
    final = [f"| {LABELS[a]} | {curves[a][-1][1]:.4f} | {curves[a][-1][2]:.4f} | "
             f"{curves[a][-1][1] - base:+.4f} | "
             + (f"{seconds[a]:.0f} s |" if a in seconds else "- |") for a in arms]
    meta = (f"{datetime.date.today().isoformat()}, {platform.node()} "
            f"({jax.devices()[0].device_kind}, {os.cpu_count()} cores), Python "
            f"{platform.python_version()}, jax {jax.__version__}; command: "
            f"`python bench/ssa_ablation.py --arms {','.join(arms)}"
            + (f" --steps {args.steps}`" if args.steps else "`"))
    table = "\n".join(lines)
    summary = "\n".join(["| arm | final val loss | final bits/byte | vs first arm | train time |",
                         "|---|---|---|---|---|", *final])
    print(summary + "\n\n" + table)
    draw_png(curves, args.png)
    with open(args.doc, "w") as f:
        f.write(f"# SSA ablation: vanilla vs selective attention\n\nMeasured {meta}.\n\n"
                f"Config `configs/ssa.py:variant=ablation,ssa=<arm>`: byte-level GPT, width "
                f"128, depth 4, 4 heads, 128-byte context, batch 32, same seed and data order "
                f"for every arm; validation = the held-out stdlib files (eval.num_batches "
                f"batches of 64 windows).\n\n{summary}\n\n![validation loss]"
                f"({os.path.basename(args.png)})\n\nEvery eval:\n\n{table}\n")
    print(f"wrote {args.doc} and {args.png}")


if __name__ == "__main__":
    main()
