# Quick start: `make demo` (train both stages on the embedded data) and `make test`.
# Both create .venv on first use and are safe to rerun.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# oneDNN's convolutions for CPU runs (imbal_jax/cpu_conv.py). Built where g++ and oneDNN's
# headers are installed (Debian/Ubuntu: apt-get install g++ libdnnl-dev); elsewhere CPU
# runs use XLA's own convolutions, about half as fast, and the build says so.
CPU_CONV := imbal_jax/native/libimbal_onednn_conv.so
DEMO_DIR ?= runs/demo
# Compiled programs are cached across runs: the second `make demo` starts faster.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax

.PHONY: install demo test clean cpu-conv

install: $(STAMP) cpu-conv

# Rebuilt when missing, older than its source, or built for another jaxlib.
cpu-conv: $(STAMP)
	@$(BIN)/python -m imbal_jax.cpu_conv build --if-needed --if-possible

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "imbal_jax needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,cpu]'
	@touch $(STAMP)

demo: $(STAMP) cpu-conv
	$(BIN)/python -m imbal_jax.main --config=configs/stage1.py --workdir=$(DEMO_DIR)/stage1
	$(BIN)/python -m imbal_jax.main --config=configs/stage2.py --workdir=$(DEMO_DIR)/stage2 \
	    --config.init_from=$(DEMO_DIR)/stage1
	@echo
	@echo "Reports: $(DEMO_DIR)/stage1/report.json (CE + SupCon encoder) and $(DEMO_DIR)/stage2/report.json (cRT head)"

# Three pytest workers share the cores, each taking whole files (so a module's fixtures
# run once), the slowest first (tests/conftest.py orders them). Three, not one per core:
# the tests wait on subprocesses, checkpoint writes and process start-ups, and on the
# 2-core development machine three workers took 7:45 to 9:20 (3 runs) where two took
# 9:34 and 9:41 (fresh clones, cold compilation cache). The multi-process tests then
# run alone, since their processes must meet within gloo's fixed 30 s rendezvous limit.
test: $(STAMP) cpu-conv
	$(BIN)/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder -m 'not multiprocess'
	$(BIN)/python -m pytest -m multiprocess

clean:
	rm -rf $(VENV) .cache runs $(CPU_CONV) $(CPU_CONV).jaxlib
