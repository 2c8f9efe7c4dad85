"""The report of one validated split: ``report.json`` (counts, reasons, length statistics,
fingerprint, policy verdict) and its human-readable ``summary.md``."""

from __future__ import annotations

from pathlib import Path

from data_contracts.errors import DataError
from data_contracts.helpers import write_json, write_text
from data_contracts.validation.streaming import ValidStats

REPORT_ORDER = ("split", "source", "layout", "layout_reason", "is_conversational", "tokenizer", "rows_in",
                "valid", "rejected", "duplicates", "limited_out", "reject_counts", "lengths", "truncated",
                "max_length", "truncation_mode", "fingerprint", "invalid_fraction",
                "max_invalid_fraction", "policy", "policy_ok", "top_reasons")


def build_report(run, tokenizer, n_written: int, stats: ValidStats) -> dict:
    """The report dict (keys in REPORT_ORDER) of a finished
    :class:`~data_contracts.validation.split.SplitValidation` that wrote ``n_written`` valid rows
    described by ``stats``."""
    cfg, layout = run.cfg, run.layout
    fraction = run.rejected / run.rows_in
    report = {
        "split": run.split, "source": run.label, "layout": layout.name, "layout_reason": layout.reason,
        "is_conversational": layout.conversational, "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "rows_in": run.rows_in, "valid": n_written, "rejected": run.rejected,
        "duplicates": run.duplicates, "limited_out": run.n_valid - n_written,
        "reject_counts": dict(run.counts.most_common()),
        **stats.report(),
        "max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode,
        "invalid_fraction": round(fraction, 6), "max_invalid_fraction": cfg.max_invalid_fraction,
        "policy": cfg.invalid_policy, "policy_ok": fraction <= cfg.max_invalid_fraction,
        "top_reasons": [{"code": c, "count": n, "example": run.first_msg[c][:200]}
                        for c, n in run.counts.most_common(3)],
    }
    report = {k: report[k] for k in REPORT_ORDER}
    assert report["rows_in"] == n_written + run.rejected + run.duplicates + report["limited_out"]
    return report


# What to change when a split's main reject reason is this code (fallback: EMPTY_SPLIT_HINT).
REJECT_HINTS = {
    "PROMPT_TOO_LONG": "raise data.max_length or shorten the prompts",
    "TEXT_TOO_LONG": "raise data.max_text_chars or data.max_length",
    "ROW_TOO_LARGE": "split or shorten the oversized rows",
    "NO_CHAT_TEMPLATE": "set model.chat_template_path or use plain-text rows",
    "TEMPLATE_ERROR": "check the chat template (model.chat_template_path)",
    "IDENTICAL_PAIR": "chosen and rejected must differ",
    "IMAGE_MISSING": "check the image paths (relative ones are read from the data file's folder)",
    "IMAGE_NEEDS_VISION_MODEL": "use a vision-language model (one with an image processor) for rows with images",
    "IMAGE_TOKENS_TRUNCATED": "raise data.max_length (image tokens are never cut)",
}
EMPTY_SPLIT_HINT = "check data.format / data.columns (the row layout) or data.max_length"


def check_not_empty(report: dict, out_dir: Path, error: type[DataError] = DataError) -> None:
    """Raise ``error`` (one line) when the split of ``report`` kept no valid row: names the split,
    its source, the counts, the top 3 reject codes with counts, what to change, and the files
    (already written) to look at. A split with valid rows passes."""
    if report["valid"] > 0:
        return
    top = report["top_reasons"]
    reasons = ", ".join(f"{r['code']} {r['count']}" for r in top) or "none"
    dups = f", {report['duplicates']} duplicates" if report["duplicates"] else ""
    hint = REJECT_HINTS.get(top[0]["code"], EMPTY_SPLIT_HINT) if top else EMPTY_SPLIT_HINT
    raise error(f"data error: {report['split']} split of {report['source']}: 0 of {report['rows_in']} rows "
                f"valid ({report['rejected']} rejected{dups}); top reasons: {reasons}; {hint}; see "
                f"{Path(out_dir) / 'rejects.parquet'} / report.json")


def summary_markdown(rep: dict) -> str:
    """summary.md of a report: the counts, the top reject reasons and the token length table."""
    lines = [f"# Data report: {rep['split']}", "", f"source: `{rep['source']}` (layout {rep['layout']}, "
             f"{'conversational' if rep['is_conversational'] else 'standard'})", "",
             "| rows in | valid | rejected | duplicates | limited out | invalid fraction | policy ok |",
             "|---|---|---|---|---|---|---|",
             f"| {rep['rows_in']} | {rep['valid']} | {rep['rejected']} | {rep['duplicates']} | "
             f"{rep['limited_out']} | {rep['invalid_fraction']:.4f} | {rep['policy_ok']} |", ""]
    if rep["top_reasons"]:
        lines += ["Top reject reasons:", ""] + [f"- {r['code']} x{r['count']}: {r['example']}"
                                               for r in rep["top_reasons"]] + [""]
    lines += ["| tokens | min | mean | p95 | max |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['min']} | {v['mean']} | {v['p95']} | {v['max']} |"
              for k, v in rep["lengths"].items()]
    lines += ["", f"truncated: {rep['truncated']['rows']} rows, {rep['truncated']['tokens']} tokens; "
              f"fingerprint `{rep['fingerprint'][:16]}`", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict) -> None:
    """summary.md, then report.json (the file that says the split is done), each written atomically."""
    write_text(out_dir / "summary.md", summary_markdown(report))
    write_json(out_dir / "report.json", report)
