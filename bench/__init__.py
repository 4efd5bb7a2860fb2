"""FleetLM benchmarks: speed and memory, never part of the pass/fail test suite."""
