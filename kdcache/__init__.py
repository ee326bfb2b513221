"""kdcache: run each teacher once, distil many students from its stored outputs."""

__version__ = "0.1.0"
