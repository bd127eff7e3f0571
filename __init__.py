"""Tandem as a ComfyUI custom node pack (this folder goes into ComfyUI/custom_nodes/).

Importing it is cheap and has no side effects: no torch, no processes, no ports. ComfyUI calls
`comfy_entrypoint()` to get the pack's extension; the multi-GPU nodes are registered there.
"""


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class TandemExtension(ComfyExtension):
        async def get_node_list(self):
            return []  # the Multi-GPU nodes arrive with the node-pack issue

    return TandemExtension()
