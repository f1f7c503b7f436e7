"""A ``--json`` command's stdout is its one JSON document, whatever else is printed meanwhile.

CI failed on ``kiln finetune --json`` because the Ray driver forwarded a raylet warning to
stdout ahead of the summary; the forwarder prints to whatever ``sys.stdout`` is at that moment,
as ``print`` does here.
"""

from __future__ import annotations

import json
import threading

from kilnlm.cli import main
from kilnlm.cli.output import json_mode, print_json


def test_prints_during_a_json_command_go_to_stderr(capsys) -> None:
    with json_mode(True):
        print("(raylet) WARNING: 10 PYTHON worker processes have been started")
        worker = threading.Thread(target=print, args=("(pid=1) a worker's log line",))
        worker.start()
        worker.join()
        print_json({"registered_version": 2})
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"registered_version": 2}
    assert "raylet" in captured.err and "a worker's log line" in captured.err


def test_without_json_stdout_is_untouched(capsys) -> None:
    with json_mode(False):
        print("progress")
        print_json({"a": 1})
    out = capsys.readouterr().out
    assert out.startswith("progress\n") and json.loads(out.split("\n", 1)[1]) == {"a": 1}


def test_a_real_command_prints_only_its_summary(capsys) -> None:
    assert main(["plan", "--flops", "1e15", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary
