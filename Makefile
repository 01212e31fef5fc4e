# Two entry points: `make repro` runs the whole DVC pipeline, `make test` runs the tests.
# Each creates the virtual environment on first use.
VENV := .venv
STAMP := $(VENV)/.installed
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

export PATH := $(abspath $(VENV))/bin:$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1
# tcmalloc avoids page-fault stalls in CPU training; used when the system has it (without it the
# runtime fixes glibc's allocator thresholds instead: pipeline/model/runtime.py).
ifneq ($(wildcard $(TCMALLOC)),)
export LD_PRELOAD := $(TCMALLOC)
endif

.PHONY: repro test install
install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

repro: $(STAMP)
	dvc repro
	dvc checkout --relink -q  # outputs become links into the DVC cache: one copy on disk, not two

test: $(STAMP)
	pytest -q
