"""A suite's results as the paper's tables and a chart: results.json, results.md, results.png.

One table per task (zero-shot, linear probe, ...): a row per model, a column per dataset showing
its headline metric, and the row's average over the datasets it has a number for. A task the model
cannot do shows n/a; a task the dataset cannot serve (no train split for the probe) shows "—".
Skipped and failed datasets are listed under the tables with the path looked for or the error.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.files import atomic_output, write_json_atomic

TASK_TITLES = {"zeroshot": "Zero-shot", "linear_probe": "Linear probe", "retrieval": "Retrieval (mean R@1)",
               "sts": "STS (Spearman x 100, projected embedding)",
               "text_probe": "Text probe (top-1, projected embedding)"}


def tables(results: dict) -> dict[str, dict]:
    """{task: {"datasets": [...], "metrics": {dataset: metric}, "rows": {model: {dataset: value | None,
    "average": value | None}}, "skipped": {model: {dataset: reason}}}} from the records; STS shown x 100.
    A None value is skipped (the reason in "skipped") or not applicable to the model."""
    out: dict[str, dict] = {}
    models = [m["name"] for m in results["models"]]
    for rec in results["records"]:
        t = out.setdefault(rec["task"], {"datasets": [], "metrics": {}, "rows": {m: {} for m in models},
                                         "skipped": {}})
        if rec["dataset"] not in t["datasets"]:
            t["datasets"].append(rec["dataset"])
        if rec.get("headline") or rec["value"] is None:
            value = rec["value"] * 100 if rec["task"] == "sts" and rec["value"] is not None else rec["value"]
            t["rows"][rec["model"]][rec["dataset"]] = value
            if rec["metric"]:
                t["metrics"][rec["dataset"]] = rec["metric"]
            if rec.get("status") == "skipped":
                t["skipped"].setdefault(rec["model"], {})[rec["dataset"]] = rec["reason"]
    for t in out.values():
        for row in t["rows"].values():
            values = [v for d in t["datasets"] if (v := row.get(d)) is not None and not math.isnan(v)]
            row["average"] = sum(values) / len(values) if values else None
    return out


SKIPPED = "—"
LEGEND = {"n/a": "n/a: the model cannot do the task (e.g. zero-shot without a text tower).",
          SKIPPED: f"{SKIPPED}: the dataset cannot serve the task (e.g. no train split for the linear probe); "
                   "the reason is in results.json."}


def _cell(v, skipped: bool = False) -> str:
    return SKIPPED if skipped else "n/a" if v is None else "nan" if math.isnan(v) else f"{v:.1f}"


def markdown(results: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    for task, t in tables(results).items():
        cols = t["datasets"]
        lines += [f"## {TASK_TITLES.get(task, task)}", "",
                  "| model | " + " | ".join(cols) + " | average |",
                  "|---|" + "---:|" * (len(cols) + 1),
                  "| *metric* | " + " | ".join(t["metrics"].get(d, "") for d in cols) + " | |"]
        for model, row in t["rows"].items():
            skipped = t["skipped"].get(model, {})
            cells = " | ".join(_cell(row.get(d), d in skipped) for d in cols)
            # no number at all: n/a if the model cannot do the task anywhere, else every dataset skipped it
            none_run = row["average"] is None and skipped and all(d in skipped for d in cols if row.get(d) is None)
            lines.append(f"| {model} | {cells} | {_cell(row['average'], bool(none_run))} |")
        lines.append("")
    for status, heading in (("skipped", "Skipped"), ("failed", "Failed")):
        listed = [d for d in results["datasets"] if d["status"] == status]
        if listed:
            lines += [f"{heading}:", ""] + [f"- {d['dataset']}: {d['reason']}" for d in listed] + [""]
    table_cells = "\n".join(line for line in lines if line.startswith("| "))
    lines += [text for mark, text in LEGEND.items() if f"| {mark} |" in table_cells]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path, title: str) -> None:
    """Grouped bars per task: datasets (and the average) on x, one bar per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tabs = tables(results)
    widest = max([len(t["datasets"]) for t in tabs.values()] + [1])
    fig, axes = plt.subplots(max(1, len(tabs)), 1, figsize=(1.2 * widest + 8, 3.2 * max(1, len(tabs))), squeeze=False)
    for ax, (task, t) in zip(axes[:, 0], tabs.items()):
        cols = t["datasets"] + ["average"]
        width = 0.8 / max(1, len(t["rows"]))
        for i, (model, row) in enumerate(t["rows"].items()):
            ys = [row.get(c) if row.get(c) is not None else 0.0 for c in cols]
            ax.bar([x + i * width for x in range(len(cols))], ys, width, label=model)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cols))], cols, rotation=30, ha="right")
        ax.set_title(TASK_TITLES.get(task, task))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_outputs(results: dict, out: str | Path, title: str) -> dict[str, str]:
    """results.json, results.md and results.png in `out`; their paths."""
    out = Path(out)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "chart": out / "results.png"}
    write_json_atomic(paths["json"], {**results, "tables": tables(results)}, indent=1, default=float)
    with atomic_output(paths["markdown"]) as tmp:
        tmp.write_text(markdown(results, title))
    chart(results, paths["chart"], title)
    return {k: str(v) for k, v in paths.items()}
