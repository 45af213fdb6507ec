"""Real servers for tests and benchmarks (loopback HTTP), not used by the stages."""
