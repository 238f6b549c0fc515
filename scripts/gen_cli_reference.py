"""Write docs/cli.md from the CLI's own --help texts (tests/test_docs.py checks it is current).

    python scripts/gen_cli_reference.py
"""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nnc_tool.cli import main

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
COMMANDS = ("encode", "decode", "info", "bench")


def render() -> str:
    runner = CliRunner()
    parts = [
        "# nnc command reference\n",
        "Generated from `--help` by `python scripts/gen_cli_reference.py`; a test fails when it is out of date.\n",
        "```text\n" + runner.invoke(main, ["--help"], prog_name="nnc", terminal_width=100).output + "```\n",
    ]
    for command in COMMANDS:
        help_text = runner.invoke(main, [command, "--help"], prog_name="nnc", terminal_width=100).output
        parts.append(f"## nnc {command}\n\n```text\n{help_text}```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    REFERENCE.write_text(render())
    print(f"wrote {REFERENCE}")
