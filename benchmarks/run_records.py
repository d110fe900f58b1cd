"""What the benchmarks that drive whole train.py / eval.py runs share (`embedded_default_seeds`, `paper_tables`):
running one in the repository root with its wall time recorded in its results.json, the machine they ran on, and
writing a result as JSON beside its Markdown table."""

import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_recording_wall_time(argv: list[str], report_path: Path) -> None:
    """Run `argv` in the repository root (no progress bars), then add its wall time to the results.json it wrote."""
    print("$", shlex.join(argv), flush=True)
    start = time.time()
    subprocess.run(argv, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    report = json.loads(report_path.read_text())
    report["wall_time_s"] = time.time() - start
    report_path.write_text(json.dumps(report, indent=2))


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_json_and_markdown(output: Path, result: dict, table: str) -> None:
    """`output` (JSON) and the same path with .md (the table)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    output.with_suffix(".md").write_text(table)
