"""Table and figure: the small GLUE tasks (CoLA, MRPC, RTE, STS-B) with full fine-tuning, LoRA and Pfeiffer
adapters (ours) and full fine-tuning in PyTorch, and the PEFT-minus-full gaps set against the LoRA paper's.

    python paper_figs/glue_table.py --out paper_figs/glue_gaps.pdf --table experiments/results/glue/table.md

Reads the committed records under RESULTS (default experiments/results): `glue_<task>/<variant>_s<seed>/
result.json` from `research sweep experiments/glue_<task>.py` (GLUE's metrics at the last evaluation, and the
run's end-to-end `wall_s`), and `glue_torch/<task>_s<seed>.json` from `scripts/baseline_glue_torch.py --out`.

The table: each task's GLUE metrics, mean +- std over seeds in points, per method; the PyTorch baseline's beside
ours; the end-to-end time ratio (PyTorch's wall time over ours, full fine-tuning, seeds averaged). The figure:
per task, LoRA's and Pfeiffer's gap to full fine-tuning on the LoRA paper's metric (Matthews correlation for
CoLA, Pearson for STS-B, accuracy for MRPC and RTE), mean over seeds with the std of the per-seed gaps (same
seed, same data order), next to the gap Hu et al. (2021, Table 2) report for LoRA on RoBERTa-base. Needs
matplotlib for the figure (`pip install -e '.[figs]'`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

TASKS = ("cola", "mrpc", "rte", "stsb")
NAMES = {"cola": "CoLA", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B"}
METRICS = {"cola": ("mcc",), "mrpc": ("f1", "accuracy"), "rte": ("accuracy",), "stsb": ("pearson", "spearman")}
# The LoRA paper's metric per task, and its RoBERTa-base (full fine-tuning, LoRA) dev scores (Hu et al. 2021).
PAPER_METRIC = {"cola": "mcc", "mrpc": "accuracy", "rte": "accuracy", "stsb": "pearson"}
PAPER = {"cola": (63.6, 63.4), "mrpc": (90.2, 89.7), "rte": (78.7, 86.6), "stsb": (91.2, 91.5)}
METHODS = ("full", "lora", "pfeiffer")


def collect(root: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """{task: {method: {seed: result}}}, our methods and "torch" (PyTorch's full fine-tuning)."""
    found: dict[str, dict[str, dict[int, dict]]] = {}
    for task in TASKS:
        for path in sorted((root / f"glue_{task}").glob("*_s*/result.json")):
            method, seed = re.fullmatch(r"(.+)_s(\d+)", path.parent.name).groups()
            found.setdefault(task, {}).setdefault(method, {})[int(seed)] = json.loads(path.read_text())
        for path in sorted((root / "glue_torch").glob(f"{task}_s*.json")):
            seed = int(re.fullmatch(rf"{task}_s(\d+)", path.stem).group(1))
            found.setdefault(task, {}).setdefault("torch", {})[seed] = json.loads(path.read_text())
    return found


def points(runs: dict[int, dict], metric: str) -> list[float]:
    return [100 * r[metric] for _, r in sorted(runs.items()) if metric in r]


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {std:.1f}" + ("" if len(values) == 3 else f" ({len(values)} seeds)")


def gaps(found: dict, task: str, method: str) -> list[float]:
    """The method's score minus full fine-tuning's, seed by seed, on the LoRA paper's metric (points)."""
    ours, full = found.get(task, {}).get(method, {}), found.get(task, {}).get("full", {})
    metric = PAPER_METRIC[task]
    return [100 * (ours[s][metric] - full[s][metric]) for s in sorted(set(ours) & set(full))]


def table(found: dict) -> str:
    header = ["task", "metric", "full", "LoRA", "Pfeiffer", "full (PyTorch)", "time PyTorch / ours",
              "LoRA - full", "Pfeiffer - full", "LoRA - full, Hu et al."]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for task in TASKS:
        runs = found.get(task, {})
        ours_s = [r["wall_s"] for r in runs.get("full", {}).values() if "wall_s" in r]
        torch_s = [r["wall_s"] for r in runs.get("torch", {}).values()]
        ratio = f"{statistics.mean(torch_s) / statistics.mean(ours_s):.2f}x" if ours_s and torch_s else "-"
        paper = PAPER[task][1] - PAPER[task][0]
        for i, metric in enumerate(METRICS[task]):
            lead = i == 0
            lora_gap = spread(gaps(found, task, "lora")) if metric == PAPER_METRIC[task] else ""
            pfeiffer_gap = spread(gaps(found, task, "pfeiffer")) if metric == PAPER_METRIC[task] else ""
            row = [NAMES[task] if lead else "", metric, *(spread(points(runs.get(m, {}), metric)) for m in METHODS),
                   spread(points(runs.get("torch", {}), metric)), ratio if lead else "", lora_gap, pfeiffer_gap,
                   f"{paper:+.1f}" if metric == PAPER_METRIC[task] else ""]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(found: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    width = 0.26
    for k, (label, values) in enumerate([
            ("LoRA - full (ours, MiniLM-L6)", [gaps(found, t, "lora") for t in TASKS]),
            ("Pfeiffer - full (ours, MiniLM-L6)", [gaps(found, t, "pfeiffer") for t in TASKS]),
            ("LoRA - full (Hu et al., RoBERTa-base)", [[PAPER[t][1] - PAPER[t][0]] for t in TASKS])]):
        x = [i + (k - 1) * width for i in range(len(TASKS))]
        mean = [statistics.mean(v) if v else 0.0 for v in values]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(x, mean, width, yerr=std, capsize=3, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(TASKS)), [f"{NAMES[t]}\n({PAPER_METRIC[t]})" for t in TASKS])
    ax.set_ylabel("gap to full fine-tuning (points)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="?", default=Path("experiments/results"),
                        help="the folder holding glue_<task>/ records and glue_torch/ (default: the committed ones)")
    parser.add_argument("--out", type=Path, default=Path("paper_figs/glue_gaps.pdf"))
    parser.add_argument("--table", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    found = collect(args.results)
    if not found:
        raise SystemExit(f"no GLUE records under {args.results}: run `research sweep experiments/glue_<task>.py` "
                         "first")
    text = table(found)
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    plot(found, args.out)


if __name__ == "__main__":
    main()
