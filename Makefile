# Entry points: `make demo`, `make test`. Both install missing build dependencies first.
BUILD ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 20
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_MODEL ?= examples/demo_model
DEMO_CONFIG ?= examples/configs/qwen3-30b-a3b.json
MAKEFLAGS += --no-print-directory

GPU_BUILD ?= build-gpu
.PHONY: all deps build test test-asan test-fuzz test-faults test-gpu demo demo-build clean

all: build

# CUTLASS's headers (6 MB from PyPI) so that every CUDA build, CI's included, compiles the
# grouped expert GEMMs.
deps:
	@bash scripts/install-deps.sh
	@bash scripts/install-cutlass.sh

$(BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

# Everything this machine can run: the unit, parity and bad-input tests, the Python tests of tools/
# (scripts/pytest.sh), then the whole suite again under AddressSanitizer + UBSan (bad input must
# never crash or read out of bounds), then the fuzzers.
test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)
	bash scripts/pytest.sh $(BUILD)
	$(MAKE) test-asan
	$(MAKE) test-fuzz

test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DMOEFORGE_ASAN=ON -DMOEFORGE_CUDA=OFF $(CMAKE_FLAGS) >/dev/null
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS)

# libFuzzer (clang) on the parsers of untrusted input: tokenizer.json, dataset lines, Parquet files, chat
# templates; FUZZ_SECONDS each.
test-fuzz: deps
	CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD) -DMOEFORGE_FUZZ=ON -DMOEFORGE_FUZZ_SECONDS=$(FUZZ_SECONDS) $(CMAKE_FLAGS) >/dev/null
	cmake --build $(FUZZ_BUILD) -j $(JOBS)
	cd $(FUZZ_BUILD) && ctest -L fuzz --output-on-failure -j $(JOBS)

# The crash-safety sweep: a run killed at every file-system step of its saves in turn, resumed each
# time (`make test` tries every 7th step).
test-faults: build
	cd $(BUILD) && MOEFORGE_FAULT_SWEEP=1 ./tests/test_cli --gtest_filter='CliFaults.*'

# The CUDA backend's tests against the CPU reference (skipped, not passed, without a GPU).
test-gpu: deps
	cmake -S . -B $(GPU_BUILD) -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON $(CMAKE_FLAGS) >/dev/null
	cmake --build $(GPU_BUILD) -j $(JOBS) --target test_cuda_ops test_cuda_model test_cuda_training test_cuda_dist cuda_ops_bench moeforge
	cd $(GPU_BUILD) && ctest -L gpu --output-on-failure -j 1

# The demo runs on the CPU: where no GPU answers it builds a CPU-only moeforge in build-cpu/ (no
# CUDA compile to wait for: most of a full build's time on 2 cores); with a GPU, the full build.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
DEMO_BUILD ?= $(if $(HAVE_GPU),$(BUILD),build-cpu)
demo-build: deps
	@if [ "$(DEMO_BUILD)" = "$(BUILD)" ]; then $(MAKE) build; else \
	  cmake -S . -B $(DEMO_BUILD) -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=OFF -DMOEFORGE_TESTS=OFF $(CMAKE_FLAGS) >/dev/null && \
	  cmake --build $(DEMO_BUILD) -j $(JOBS) --target moeforge; fi

demo: demo-build
	@if [ -f $(DEMO_CONFIG) ]; then echo "== moeforge inspect $(DEMO_CONFIG)  (config only: no weights)"; \
	  $(DEMO_BUILD)/moeforge inspect $(DEMO_CONFIG); echo; fi
	@echo "== moeforge inspect $(DEMO_MODEL)  (a bundled tiny Qwen3-MoE chat model with its own tokenizer)"
	@$(DEMO_BUILD)/moeforge inspect $(DEMO_MODEL)
	@echo
	@echo "== before fine-tuning: moeforge generate --chat --prompt 'Count from 12 to 17.'"
	@$(DEMO_BUILD)/moeforge generate --model $(DEMO_MODEL) --chat --prompt 'Count from 12 to 17.' --max-new-tokens 24
	@echo
	@echo "== fine-tune it on counting conversations (examples/demo_recipe.yaml), on the CPU"
	@$(DEMO_BUILD)/moeforge train examples/demo_recipe.yaml output_dir=$(BUILD)/demo_run
	@echo
	@echo "== held-out conversations before and after (moeforge eval --data examples/data/count_chat_eval.jsonl)"
	@printf 'before: '; $(DEMO_BUILD)/moeforge eval --model $(DEMO_MODEL) --data examples/data/count_chat_eval.jsonl --summary \
	  | sed -e 's/.*"token_weighted_loss":\([0-9.]*\),"perplexity":\([0-9.]*\).*/loss \1, perplexity \2/'
	@printf 'after:  '; $(DEMO_BUILD)/moeforge eval --model $(BUILD)/demo_run/final --data examples/data/count_chat_eval.jsonl --summary \
	  | sed -e 's/.*"token_weighted_loss":\([0-9.]*\),"perplexity":\([0-9.]*\).*/loss \1, perplexity \2/'
	@echo
	@echo "== after fine-tuning: the same prompt, and one held out of training (29 to 35)"
	@$(DEMO_BUILD)/moeforge generate --model $(BUILD)/demo_run/final --chat --prompt 'Count from 12 to 17.' --max-new-tokens 24
	@$(DEMO_BUILD)/moeforge generate --model $(BUILD)/demo_run/final --chat --prompt 'Count from 29 to 35.' --max-new-tokens 24
	@$(DEMO_BUILD)/moeforge plot $(BUILD)/demo_run
	@echo
	@echo "The fine-tuned model is a standard Hugging Face folder: $(BUILD)/demo_run/final"
	@ls $(BUILD)/demo_run/final

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
