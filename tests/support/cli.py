"""Running the command line in tests: in-process through CliRunner, with only the test's settings."""

from __future__ import annotations

import os
from collections.abc import Mapping

from click.testing import CliRunner, Result

from machinery.cli import main

# Variables that would point a command at another broker than the test's.
CONFIG_VARS = ("BROKER", "RESULT_BACKEND", "LOCK", "DEFAULT_QUEUE", "MULTIPLE_BROKER_SEPARATOR")


def invoke(args: list[str], env: Mapping[str, str] | None = None) -> Result:
    """Run the CLI in-process with only ``env`` configuring it."""
    clean: dict[str, str | None] = dict.fromkeys(CONFIG_VARS)
    clean.update(env or {})
    return CliRunner().invoke(main, args, env=clean, prog_name="machinery")


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def subprocess_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(overrides)
    return env
