# Two commands do everything (README.md):  `make demo`  and  `make test`.
# The first run creates .venv and installs; later runs reuse it (the stamp file tracks pyproject).

VENV       ?= .venv
PY         := $(VENV)/bin/python
SDDE       := $(VENV)/bin/sdde
# torch from the machine's local wheel cache; other versions download gigabytes
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS     ?= train,eval,parquet,ray,dev
STAMP      := $(VENV)/.installed-$(EXTRAS)
DEMO_DIR   ?= runs/demo
PORT       ?= 8000

.PHONY: install test lint format demo serve-demo promtool bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

# promtool checks and unit-tests the Prometheus rules; the deploy tests also start a real server
promtool:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "promtool missing: run 'sudo apt-get install prometheus'"; exit 1; fi; }

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: install promtool lint
	$(PY) -m pytest

# Train a small SDDE ensemble on the bundled digits data, export it, and serve it. A quarter of
# the training images is held out: enough errors for the temperature fit to find an interior
# optimum (on a split every member gets right the NLL falls all the way to T -> 0).
demo: install
	$(SDDE) train --data digits --arch lenet --members 5 --method sdde --epochs 20 \
	  --val-fraction 0.25 --out $(DEMO_DIR)
	$(SDDE) export $(DEMO_DIR) -o $(DEMO_DIR)/model.onnx
	$(PY) -m sdde_serve.samples $(DEMO_DIR)/samples
	@echo
	@echo "Try it from another terminal:"
	@echo "  curl -s -F files=@$(DEMO_DIR)/samples/digit.png -F files=@$(DEMO_DIR)/samples/noise.png -F files=@$(DEMO_DIR)/samples/photo.png http://127.0.0.1:$(PORT)/v1/predict"
	@echo "  (the digit is answered; noise and photo are flagged out of distribution by the score the"
	@echo "   export chose on outliers it synthesized from the validation images: see its output above)"
	@echo
	$(SDDE) serve $(DEMO_DIR)/model.onnx --port $(PORT)

bench: install
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_score.py
	$(PY) benchmarks/mnist_ood.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
