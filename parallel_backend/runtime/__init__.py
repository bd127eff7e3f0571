"""The floor of processes and wires: what starts, watches and talks to the workers (more modules move here later)."""
