"""The test package. Imported before conftest.py, so what it sets holds for every import and child process of the run.

This machine (and CI, which runs with the machine's environment) sets PYTHONDONTWRITEBYTECODE=1, so each of the
hundreds of Python processes the tests start (`serve`, its embedded worker, one child per optimizer job, the CLI)
compiled app/ and optimizer/ from source again: 0.75 s of import instead of 0.45 s with their bytecode cached. The run
uses Python's default instead: bytecode is kept in __pycache__ (ignored by git and by the Docker build context), and
pytest keeps its assertion-rewritten tests/*.py there too.
"""

import os
import sys

os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
