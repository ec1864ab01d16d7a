"""The precond benchmark: real workloads, a fair lr-sweep protocol, tables and plots. Uses only the
public API of :mod:`precond`. Run ``python -m precond_bench --help``."""
