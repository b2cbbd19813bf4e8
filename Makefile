# The README's two set-up commands: `make demo` (main job on the embedded default data) and `make test`.
PYTHON ?= python3

.PHONY: install demo test

install:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: install
	$(PYTHON) -m training.pretrain
	$(PYTHON) -m training.evaluate outputs/demo/final --data data/groundtruth

test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2  # one process per core, one thread each
