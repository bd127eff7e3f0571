"""A stand-in for a ComfyUI custom-node package: tests import it under its folder's path, as ComfyUI imports
custom nodes (`/.../custom_nodes/Pack`), so its classes and functions have module names a worker cannot import
by name (parallel_backend/runtime/host_modules.py makes them importable there).

This __init__ runs only on the host: a worker imports the package's submodules without it (it would register
nodes with ComfyUI's server in a real pack). `INIT_RAN` says where it ran.
"""

INIT_RAN = True
