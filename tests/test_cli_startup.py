"""`kprune --help` and the parser load no heavy library: torch, transformers and datasets are imported
by the commands that need them."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "datasets", "numpy", "pyarrow", "prefect")

HELP = f"""
import sys
import kprune.cli
try:
    kprune.cli.build_parser().parse_args(["--help"])
except SystemExit as stop:
    assert stop.code == 0
print(sorted(name for name in {HEAVY!r} if name in sys.modules))
"""

FIRST_USE = """
import sys
import kprune
assert "torch" not in sys.modules
kprune.prune
print("torch" in sys.modules, set(kprune.__all__) <= set(dir(kprune)))
"""


def run(code: str) -> list[str]:
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip().splitlines()


def test_help_and_parser_import_no_heavy_module():
    lines = run(HELP)
    assert any("export-onnx" in line for line in lines) and any("prune" in line for line in lines)
    assert lines[-1] == "[]"


def test_the_library_loads_its_names_on_first_use():
    assert run(FIRST_USE)[-1] == "True True"
