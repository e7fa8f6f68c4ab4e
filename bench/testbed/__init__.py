"""A multi-host testbed on one machine: Linux network namespaces, shaped veths, real processes
(`python -m bench.testbed`; docs/scaling.md, "The testbed")."""
