# One command each: `make test` (fresh clone -> virtualenv -> whole suite), `make demo` (fresh clone -> leaderboard),
# `make lint`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# glibc malloc thrashes on large 3D activations without these (see docs/speed.md).
export MALLOC_MMAP_THRESHOLD_ := 1073741824
export MALLOC_TRIM_THRESHOLD_ := 1073741824

.PHONY: venv test demo lint speed speed-attacks speed-baseline speed-compare speed-runner speed-gpu accuracy accuracy-zoo \
	clean

venv: $(VENV)/.installed

# torch is installed first and pinned, so the range in pyproject.toml is met by the CPU wheel
# instead of a multi-GB CUDA build. torchattacks (the torchattacks-pgd backend, tested in CI) goes in with
# --no-deps: its metadata pulls torchvision, a CUDA torch and an old requests; MONAI (the networks of
# docs/your-model.md, run by the suite) too, so that its metadata never moves torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1 monai==1.6.1
	touch $@

test: venv
	$(PY) -m pytest -q

# The demo grid of configs/demo.toml: generates the built-in cohort, trains cnn3d, hybrid and hybrid_e2e when their
# checkpoints are missing, runs FGSM and PGD at six budgets on 100 test subjects, writes the leaderboard page.
demo: venv
	$(VENV)/bin/medrobust run configs/demo.toml

lint: venv
	$(VENV)/bin/ruff check benchmark models attacks reports tests scripts

# Everything that times lives in tests/speed (pytest-benchmark) and scripts/speed; figures in docs/speed.md.
# speed: cohort generation, and training the four models on the demo cohort.
speed: venv
	$(PY) scripts/speed/cohort.py
	$(PY) scripts/speed/training.py --out runs/speed-training

# Attack speed against the floor (one forward + backward w.r.t. the input), the pytest-benchmark benchmarks of
# tests/speed at the demo grid: the JSON (ratios in each benchmark's extra_info) and a markdown table go to
# $(SPEED_OUT). Settings from MEDROBUST_BENCH_* (tests/speed/ratios.py), e.g. MEDROBUST_BENCH_THREADS=1 on a
# shared CPU.
SPEED_OUT ?= runs/speed-attacks
speed-attacks: venv
	mkdir -p $(SPEED_OUT)
	MEDROBUST_BENCH_TABLE=$(SPEED_OUT)/ratios.md $(PY) -m pytest -q -p no:cacheprovider tests/speed \
		--benchmark-only --benchmark-json=$(SPEED_OUT)/benchmarks.json

# The regression check of the timing ratios: these benchmarks at these settings, against the baseline committed for
# this machine kind (tests/speed/baselines/<kind>.json, the kind from tests/speed/ratios.py); a whole-call ratio
# more than MEDROBUST_BENCH_MARGIN (15 %) over its baseline's fails. `make speed-baseline` writes (refreshes) the
# baseline of this machine kind: run it on an otherwise idle machine, and commit the file with the reason.
BASELINE_ENV := MEDROBUST_BENCH_THREADS=1 MEDROBUST_BENCH_ROUNDS=5 MEDROBUST_BENCH_MODELS=cnn3d \
	MEDROBUST_BENCH_ATTACKS=fgsm,pgd-linf,pgd-l2,bim-paper,apgd-linf,cw,square,universal-sign
BASELINE = tests/speed/baselines/$(shell $(BASELINE_ENV) $(PY) tests/speed/ratios.py).json
BASELINE_TESTS := $(addprefix tests/speed/test_attack_speed.py::,test_floor test_attack test_plain_loop)
speed-baseline: venv
	mkdir -p tests/speed/baselines
	$(BASELINE_ENV) $(PY) -m pytest -q -p no:cacheprovider $(BASELINE_TESTS) --benchmark-only \
		--benchmark-json=$(BASELINE)

speed-compare: venv
	@test -f $(BASELINE) || { echo "no ratio baseline for this machine kind: $(BASELINE) (make speed-baseline)"; \
		exit 2; }
	mkdir -p $(SPEED_OUT)
	$(BASELINE_ENV) MEDROBUST_BENCH_BASELINE=$(BASELINE) MEDROBUST_BENCH_TABLE=$(SPEED_OUT)/compare.md \
		$(PY) -m pytest -q -p no:cacheprovider $(BASELINE_TESTS) --benchmark-only \
		--benchmark-compare=$(BASELINE) --benchmark-json=$(SPEED_OUT)/compare.json

# Runner overhead (the demo grid's wall time against its attack time) and the finished-grid re-run, with and
# without SSIM (docs/speed.md); needs the demo's trained models (make demo).
speed-runner: venv
	$(PY) scripts/speed/runner.py --json runs/speed-runner.json
	$(PY) scripts/speed/runner.py --no-ssim --out runs/speed-runner-nossim --json runs/speed-runner-nossim.json

# On a CUDA machine: the suite, the demo from scratch, and the attack-speed benchmarks (scripts/speed/gpu.sh).
SPEED_GPU_OUT ?= runs/speed-gpu
speed-gpu: venv
	scripts/speed/gpu.sh $(SPEED_GPU_OUT)

clean:
	rm -rf $(VENV) build dist *.egg-info

# Clean-accuracy table of docs/accuracy.md: 1000-subject cohort, four models, three training seeds.
accuracy: venv
	$(PY) scripts/docs/accuracy_table.py --n 1000 --seeds 0 1 2 --out runs/accuracy --markdown docs/accuracy.md

# The zoo's rows (sfcn, MONAI's densenet121), cut to fit a CPU: one seed, 10 epochs, one torch thread.
accuracy-zoo: venv
	$(PY) scripts/docs/accuracy_table.py --models sfcn densenet121 --seeds 0 --epochs 10 --threads 1 \
		--section zoo --out runs/accuracy --markdown docs/accuracy.md
