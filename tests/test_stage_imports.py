"""The pipeline's flows module, which every stage with a flow imports, leaves the scoring libraries
(sklearn; kprune.evaluate) to the step that scores: the prune stage's peak RSS is compared with the
library's."""

import subprocess
import sys

IMPORT_FLOWS = """
import sys
import pipeline.flows
print(sorted(name for name in ("sklearn", "kprune.evaluate") if name in sys.modules))
"""


def test_flows_import_no_scoring_library():
    completed = subprocess.run(
        [sys.executable, "-c", IMPORT_FLOWS], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[]"
