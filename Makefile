# The two commands of the README: `make run` (the embedded default pipeline) and `make test`.
VENV_PY := .venv/bin/python

.PHONY: run test install
run: .install-stamp
	$(VENV_PY) run_pipeline.py

test: .install-stamp
	$(VENV_PY) -m pytest -q

install: .install-stamp

.install-stamp: pyproject.toml scripts/install.sh
	bash scripts/install.sh
