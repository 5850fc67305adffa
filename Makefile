# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (Python 3.10, the pins of requirements.txt) once; later runs install nothing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= configs/ShapesLT/ce_mask_rcnn_R_18_FPN_demo.yaml
# A fresh directory per demo run, so a second run never overwrites the first one's outputs.
DEMO_OUTPUT ?= output/demo-$(shell date +%Y%m%d-%H%M%S)
# Likewise a fresh folder per benchmark run (README "Results" lists what each tool writes there).
BENCH_OUTPUT ?= output/benchmark-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test benchmark clean-venv

setup: $(STAMP)

# The detectron2 wheel is cp310 only. Try $PYTHON310, python3.10, then pyenv's 3.10 builds
# (on these machines the python3.10 shim exists but fails unless pyenv selects 3.10).
$(PY):
	@py=""; \
	for c in "$${PYTHON310:-}" python3.10 $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.10*/bin/python 2>/dev/null) /usr/bin/python3.10; do \
	  if [ -n "$$c" ] && "$$c" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then py="$$c"; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
	  echo "error: longtail needs Python 3.10 (the sal-detectron2 wheel is built for cp310 only)." >&2; \
	  echo "       Install it (pyenv install 3.10, or apt-get install python3.10 python3.10-venv)," >&2; \
	  echo "       or point PYTHON310=/path/to/python3.10 at one, then run make again." >&2; \
	  exit 1; \
	fi; \
	echo "creating $(VENV) with $$py"; \
	"$$py" -m venv $(VENV)

# --no-cache-dir: torch's wheels (several GB with its CUDA dependencies) are installed once; a
# second copy in pip's cache only fills the disk (a CI run once failed with "No space left").
$(STAMP): $(PY) requirements.txt pyproject.toml
	$(PY) -m pip install --disable-pip-version-check --no-cache-dir -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $@

demo: $(STAMP)
	$(PY) train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The README's three result tables: every method on shapes-lt (under an hour on 2 cores), the
# per-method head overhead at LVIS scale, and the evaluator against lvis-api.
benchmark: $(STAMP)
	$(PY) -m longtail.tools.benchmark --out $(BENCH_OUTPUT)/accuracy
	$(PY) -m longtail.tools.bench_heads --out $(BENCH_OUTPUT)/heads
	$(PY) -m longtail.tools.bench_eval --out $(BENCH_OUTPUT)/eval

clean-venv:
	rm -rf $(VENV)
