# Two commands do all the set-up on a fresh machine:
#   make demo   compress the built-in models and print the side-by-side table (writes a report)
#   make test   run the test suite
STAMP := .venv/.netshrink-setup

.PHONY: demo test setup clean-venv

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/netshrink demo $(ARGS)

test: $(STAMP)
	scripts/test.sh $(ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	scripts/setup.sh
	touch $@

clean-venv:
	rm -rf .venv
