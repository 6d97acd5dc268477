"""The pipeline's report: the summary table (stdout and report.md), report.html with the
plots inline (base64 PNG), summary.json, and the sample generations."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

COLUMNS = [("stage", "stage"), ("optimised", "what it optimised"), ("metric", "metric"),
           ("before_text", "before"), ("after_text", "after"), ("chance_text", "chance"), ("tokens_per_s", "tokens/s"),
           ("wall_s", "wall s"), ("peak_mem_mb", "peak MB")]
# shown after "after" when a stage reports one (PPO, GRPO: the KL to the reference)
KL_COLUMN = ("kl_text", "KL")


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key in ("wall_s", "peak_mem_mb"):
        return f"{value:.1f}"
    return str(value)


def table_rows(rows: list[dict]) -> list[dict]:
    """The summary's rows with a stage that trained several models (the task heads) expanded
    into one row per model, named "stage: model"."""
    out = []
    for row in rows:
        subs = row.get("rows")
        if not subs:
            out.append(row)
            continue
        for sub in subs:
            out.append({**sub, "stage": f"{row['stage']}: {sub['head']}"})
    return out


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    if not any(r.get(KL_COLUMN[0]) for r in rows):
        return COLUMNS
    i = [k for k, _ in COLUMNS].index("after_text") + 1
    return COLUMNS[:i] + [KL_COLUMN] + COLUMNS[i:]


def format_table(rows: list[dict]) -> str:
    """The summary as a Markdown table (also what the command prints)."""
    rows = table_rows(rows)
    columns = _columns(rows)
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def _peft_table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | share of model | eval loss before -> after | tokens/s | wall s | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = 100.0 * r["trainable_params"] / r["params"]
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {share:.2f}% | {r['before_text']} -> "
                     f"{r['after_text']} | {_cell('tokens_per_s', r.get('tokens_per_s'))} | {r['wall_s']:.1f} | "
                     f"{r['peak_mem_mb']:.1f} |")
    return "\n".join(lines)


def _heads_table(rows: list[dict]) -> str:
    lines = ["| head | data | trunk | metric | untrained head | trained | chance | held-out records | steps | "
             "trainable params |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['head']} | {r['data']} ({r['task']}) | {r['trunk']} | {r['metric']} | {r['before_text']} | "
                     f"{r['after_text']} | {r['chance_text']} | {r['eval_records']} | {r['steps']} | "
                     f"{r['trainable_params']:,} |")
    return "\n".join(lines)


def _plots(summary: dict) -> list[tuple[str, str]]:
    """(title, PNG path) of every loss curve the stages wrote."""
    plots = []
    for row in table_rows(summary["stages"]):
        curves = row.get("loss_curve")
        if isinstance(curves, str):
            plots.append((f"{row['stage']}: loss", curves))
        if row.get("rl_curves"):  # PPO, GRPO: mean reward and KL to the reference per iteration
            plots.append((f"{row['stage']}: reward and KL", row["rl_curves"]))
    for row in summary["extra"].get("peft", {}).get("peft", []):
        if row.get("loss_curve"):
            plots.append((f"peft {row['method']}: loss", row["loss_curve"]))
    return [(t, p) for t, p in plots if Path(p).is_file()]


def _samples(summary: dict) -> list[tuple[str, list[dict]]]:
    return [(f"after {stage}", extra["samples"]) for stage, extra in summary["extra"].items() if "samples" in extra]


def _markdown(summary: dict, out: Path) -> str:
    s = summary["settings"]
    parts = [
        "# fastllm pipeline report", "",
        f"Mode: {'--quick' if s['quick'] else 'default'}; device: {summary['device']}; "
        f"fine-tuning from: {s['model'] or 'the decoder pre-trained here'}; wall time of this run: "
        f"{summary['wall_s']:.0f} s.", "",
        "## Summary", "", format_table(summary["stages"]), "",
        f"Peak memory: {summary['memory']}. Every before -> after is measured on the held-out data the stage's "
        "trainer evaluates on, before is the model the stage starts from (for the task heads and the reward model: "
        "the trunk with a fresh, untrained head). Eval loss is the held-out cross-entropy in nats per token "
        "(perplexity in brackets). Chance: what a guess scores (a uniform distribution over the vocabulary; "
        "the majority class; a constant; tagging every word O; a coin flip for a pair). tokens/s counts the tokens "
        "the loss was taken on (pre-training, SFT, PEFT), all tokens of both sides of the pairs (reward model, "
        "DPO), the real input tokens of the sequences trained on (task heads), or the response tokens sampled "
        "per second of an iteration (rollout, scoring and update; PPO, GRPO). PPO and GRPO: the mean reward-model "
        "score (normalised to mean 0, sd 1 on the preference pairs, so 0 is its chance) of sampled responses to "
        "instruction prompts left out of their training, before = the SFT model, after = the trained policy, with "
        "the same sampling settings and random numbers; KL = the trained policy's KL to the SFT model, per "
        "response (nats), estimated on those samples.", "",
    ]
    heads = next((r["rows"] for r in summary["stages"] if r["stage"] == "heads" and r.get("rows")), None)
    if heads:
        parts += ["## Task heads", "", _heads_table(heads), ""]
    peft = summary["extra"].get("peft", {}).get("peft")
    if peft:
        parts += ["## PEFT methods side by side", "", _peft_table(peft), ""]
    samples = _samples(summary)
    if samples:
        parts += ["## Sample generations (greedy, same prompts)", ""]
        for title, rows in samples:
            parts.append(f"**{title}**")
            parts.append("")
            for r in rows:
                completion = r["completion"].replace("\n", " ").strip() or "(empty)"
                parts.append(f"- {r['prompt']} -> {completion}")
            parts.append("")
    plots = _plots(summary)
    if plots:
        parts += ["## Plots", ""]
        for title, path in plots:
            rel = Path(path).resolve().relative_to(out.resolve()) if _inside(path, out) else Path(path)
            parts += [f"![{title}]({rel.as_posix()})", ""]
    return "\n".join(parts)


def _inside(path: str, out: Path) -> bool:
    try:
        Path(path).resolve().relative_to(out.resolve())
        return True
    except ValueError:
        return False


def _html(markdown: str, summary: dict) -> str:
    """A self-contained page: the Markdown's text in <pre>-free simple HTML, plots inline."""
    body, table = [], []

    def flush_table():
        if not table:
            return
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table if not line.startswith("|---")]
        body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>")
        for r in rows[1:]:
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
        body.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("!["):
            continue  # images are inlined below
        elif line.strip():
            body.append(f"<p>{html.escape(line.strip('*'))}</p>")
    flush_table()
    for title, path in _plots(summary):
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        body.append(f"<h3>{html.escape(title)}</h3><img alt=\"{html.escape(title)}\" "
                    f"src=\"data:image/png;base64,{data}\">")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>fastllm pipeline report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out: Path, summary: dict) -> dict:
    """Write report.md, report.html and summary.json into out; returns their paths."""
    out = Path(out)
    md = _markdown(summary, out)
    paths = {"report.md": out / "report.md", "report.html": out / "report.html",
             "summary.json": out / "summary.json"}
    paths["report.md"].write_text(md + "\n", encoding="utf-8")
    paths["report.html"].write_text(_html(md, summary), encoding="utf-8")
    paths["summary.json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths
