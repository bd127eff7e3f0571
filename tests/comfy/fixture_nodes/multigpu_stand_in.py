"""What ComfyUI's MultiGPU CFG Split (v0.23+) attaches to a model on a machine with a second device: a base clone
per extra device under the "multigpu" key. On a CPU-only host the real node finds no extra device and attaches
nothing, so this node attaches one clone on the model's own device, with ComfyUI's own ModelPatcher methods."""


from .model_node import ModelToModel


class TandemTestMultiGPUStandIn(ModelToModel):
    def build(self, model):
        patched = model.clone()
        copy = patched.clone()
        copy.is_multigpu_base_clone = True
        patched.set_additional_models("multigpu", [copy])
        patched.match_multigpu_clones()
        return (patched,)


NODES = {"TandemTestMultiGPUStandIn": TandemTestMultiGPUStandIn}
