"""The DiffBench task suite: YAML files per level, written by ``tasks/generate.py``."""
