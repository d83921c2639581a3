"""The tier that runs our modules inside the real DataFlux Func worker (see harness.py).

A package so that its conftest does not shadow tests/conftest.py as the
module `conftest`, which other test modules import."""
