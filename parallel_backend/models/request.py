"""What a user asks a pipeline for: the schedulers by name and a validated request. Imports no torch, so a
surface (the CLI) checks a request before anything heavy loads; the sampling loop is sampling.py's."""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime import validation

# name -> (diffusers scheduler class, overrides of the model's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@dataclass
class GenerationRequest:
    """What to generate. Validated on creation (`validation`): a value of the wrong kind raises TypeError, one
    out of range ValueError, each naming the field. steps: 1 to 10000; cfg: 0 to 100 (1: no guidance); seed:
    0 to 2**63 - 1; num_images: 1 to 10000 (and what memory allows: the pipeline checks it)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    cfg: float = 5.0
    seed: int = 0
    scheduler: str = "euler"
    num_images: int = 1

    def __post_init__(self):
        self.prompt = validation.text("prompt", self.prompt)
        self.negative_prompt = validation.text("negative_prompt", self.negative_prompt)
        self.steps = validation.whole_number("steps", self.steps, 1, validation.MAX_STEPS)
        self.cfg = validation.finite_number("cfg", self.cfg, 0.0, validation.MAX_CFG)
        self.seed = validation.seed(self.seed)
        self.scheduler = validation.one_of("scheduler", self.scheduler, SCHEDULERS)
        self.num_images = validation.whole_number("num_images", self.num_images, 1, validation.MAX_IMAGES)
