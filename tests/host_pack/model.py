"""A small model and patch functions of the stand-in custom-node package (see __init__.py)."""

import torch


class Patchable(torch.nn.Module):
    """forward(x, t, context=None, transformer_options=None): (B, dim) -> (B, dim); every function in
    transformer_options["patches"]["post"] is applied to the output, and `gain` (an instance setting a loader
    may change after building) scales it."""

    def __init__(self, dim: int = 8, device=None):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, device=device)
        self.gain = 1.0

    def forward(self, x, t, context=None, transformer_options=None):
        h = self.proj(x) * self.gain + t.reshape(-1, 1)
        for patch in ((transformer_options or {}).get("patches") or {}).get("post", ()):
            h = patch(h)
        return h


def double(h):
    """A patch function defined at the top of a module: it travels by reference."""
    return h * 2.0
