"""One module per dvc.yaml stage, each reading its own params.yaml section.

Run one with ``python -m pipeline.stages.NAME`` from the project root; ``dvc repro`` runs them in order.
"""

import sys

# `python -m pipeline.stages.NAME` imports this package before NAME, and sys.argv[0] is "-m" until NAME
# is found: under `dvc repro` the stage is handed to the run's warm process here, before NAME imports
# torch and the rest (pipeline.warm). hand_over() exits with the stage's status, or returns.
if sys.argv[:1] == ["-m"] and sys.orig_argv[-len(sys.argv)].startswith(__name__ + "."):
    from pipeline.warm import hand_over

    hand_over(sys.orig_argv[-len(sys.argv)])
