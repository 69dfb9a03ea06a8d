# Entry points: `make demo`, `make test`. Both install missing build dependencies first.
BUILD ?= build
ASAN_BUILD ?= build-asan
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_MODEL ?= tests/fixtures/qwen3_moe_a
DEMO_CONFIG ?= ../shared/configs/qwen3-30b-a3b.json
MAKEFLAGS += --no-print-directory

.PHONY: all deps build test test-asan demo clean

all: build

deps:
	@bash scripts/install-deps.sh

$(BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

# Everything this machine can run: the unit, parity and bad-input tests, then the whole suite
# again under AddressSanitizer + UBSan (bad input must never crash or read out of bounds).
test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)
	$(MAKE) test-asan

test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DMOEFORGE_ASAN=ON -DMOEFORGE_CUDA=OFF $(CMAKE_FLAGS) >/dev/null
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS)

demo: build
	@if [ -f $(DEMO_CONFIG) ]; then echo "== moeforge inspect $(DEMO_CONFIG)  (config only: no weights)"; \
	  $(BUILD)/moeforge inspect $(DEMO_CONFIG); echo; fi
	@echo "== moeforge inspect $(DEMO_MODEL)"
	@$(BUILD)/moeforge inspect $(DEMO_MODEL)
	@echo
	@echo "== moeforge eval on 3 rows of token ids"
	@printf '%s\n' '{"input_ids": [1, 5, 9, 2, 7, 3, 11, 4]}' '{"input_ids": [100, 17, 42, 42, 8]}' \
	  '{"input_ids": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], "labels": [-100, -100, -100, 1, 5, 9, 2, 6, 5, 3, 5]}' \
	  > $(BUILD)/demo_tokens.jsonl
	@$(BUILD)/moeforge eval --model $(DEMO_MODEL) --tokens $(BUILD)/demo_tokens.jsonl
	@echo
	@echo "== moeforge convert (load + save again; same names, layout and dtypes)"
	@$(BUILD)/moeforge convert --model $(DEMO_MODEL) --out $(BUILD)/demo_converted --overwrite
	@$(BUILD)/moeforge eval --model $(BUILD)/demo_converted --tokens $(BUILD)/demo_tokens.jsonl

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
