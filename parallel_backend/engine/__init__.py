"""The engine floor: the pool engine, meshes, configs, the oracle and the worker program."""
