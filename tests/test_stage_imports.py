"""What the prune stage's process imports before its loop: its peak RSS is compared with the library's.
The flows module, which every stage with a flow imports, leaves the scoring libraries (sklearn;
kprune.evaluate) to the step that scores; the prune stage reads its tables with pyarrow alone (no datasets,
no pandas) and imports MLflow's client only once its loop has ended."""

import subprocess
import sys

IMPORT_PRUNE_STAGE = """
import sys
import pipeline.stages.prune
import pipeline.flows
from pipeline.project import start_stage

start_stage()
heavy = ("sklearn", "kprune.evaluate", "datasets", "pandas", "mlflow")
print(sorted(name for name in heavy if name in sys.modules))
"""


def test_the_prune_stage_imports_no_scoring_table_or_tracking_library_before_its_loop():
    completed = subprocess.run(
        [sys.executable, "-c", IMPORT_PRUNE_STAGE], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[]"
