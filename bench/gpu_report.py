"""The closing table of ``bench/gpu_check.sh``: each part's status and time, then one row per
throughput result.

    python bench/gpu_report.py OUT_DIR     # reads OUT_DIR/parts.tsv and OUT_DIR/*.json

Uses nothing but the standard library, so the table prints even where torch is broken.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def parts_table(folder: Path) -> list[str]:
    rows = [("part", "status", "seconds", "detail")]
    tsv = folder / "parts.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        name, status, seconds, detail = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append((name, status, seconds, detail))
    return _format(rows)


def throughput_table(folder: Path) -> list[str]:
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not results:
        return ["no throughput result"]
    rows = [
        ("run", "device", "procs", "params", "seq", "batch", "tokens/s", "MFU", "step ms", "data wait", "max mem")
    ]  # fmt: skip
    for r in results:
        memory = r.get("max_memory_gib")
        rows.append(
            (
                r.get("label", "?"),
                f"{r['device']} {r['precision']}",
                str(r["processes"]),
                f"{r['parameters_m']}M",
                str(r["seq_len"]),
                str(r["global_batch"]),
                f"{r['tokens_per_s']:,.0f}",
                f"{100 * r['mfu']:.1f}%",
                f"{r['step_ms']:.1f}",
                f"{100 * r['data_wait']:.0f}%",
                "-" if memory is None else f"{memory:.1f} GiB",
            )
        )
    peaks = {(r["device"], r["peak_flops_per_device"], r["peak_source"]) for r in results}
    notes = [f"peak {p / 1e12:.4g} TFLOP/s per {d} ({s})" for d, p, s in sorted(peaks)]
    return _format(rows) + notes


def _format(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def main(folder: str) -> None:
    path = Path(folder)
    print("\n".join(["", *parts_table(path), "", *throughput_table(path)]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
