# The README's two set-up commands: `make demo` (main job on the embedded default data) and `make test`.
PYTHON ?= python3

.PHONY: install demo test

install:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: install
	$(PYTHON) examples/embed.py

test: install
	$(PYTHON) -m pytest -q
