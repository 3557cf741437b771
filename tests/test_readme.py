"""The README: its Python examples run as written (a newcomer's first contact with the library), it stays a front page
(at most 250 lines), and its lists of config groups are exactly what `spiffy/conf/` holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from spiffy.lab.sweep import CONF_DIR

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README has the API example and the model.generate example"
    outputs = []
    for block in blocks:
        out = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        outputs.append(out.stdout)
    assert "| NFE 32 ->" in outputs[0]
    assert "| NFE" in outputs[1]


def test_readme_is_a_front_page_and_lists_every_config_option():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    listed = dict(re.findall(r"^- `(\w+)`: (.+)$", text, flags=re.M))
    groups = ("model", "task", "decoder", "graph", "experiment", "tracking")
    assert set(groups) <= set(listed)
    for group in groups:
        shipped = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert listed[group].split(", ") == shipped, group
