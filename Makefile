# The two commands of the README: `make run` (the embedded default pipeline) and `make test`.
VENV_PY := .venv/bin/python

.PHONY: run test test-fast install
run: .install-stamp
	$(VENV_PY) run_pipeline.py

# two xdist workers: one runs the tests on the shared Ray runtime in order, one the tests that need Ray down in the
# pytest process; both share the tests that only wait on processes of their own and the fast ones
# (tests/conftest.py, pytest_collection_modifyitems)
test: .install-stamp
	$(VENV_PY) -m pytest -q -n 2 --dist loadgroup

# the tests that start nothing (no Ray, MLflow or subprocess): well under a minute, for the edit-test loop
test-fast: .install-stamp
	$(VENV_PY) -m pytest -q -m "not slow"

install: .install-stamp

.install-stamp: pyproject.toml scripts/install.sh
	bash scripts/install.sh
