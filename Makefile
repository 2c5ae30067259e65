# The two commands the README opens with. Each sets up .venv/ itself when missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DEMO    := demo_out

.PHONY: demo test setup clean

demo: $(STAMP)
	.venv/bin/hardneg demo --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q

setup: $(STAMP)

# Reinstall when the dependency list changes; the stamp makes a second `make` instant.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(DEMO) mlflow.db mlartifacts
