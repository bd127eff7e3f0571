"""How each DiT family is cut for sequence parallelism (ulysses, ring, usp), as data: one row per family and host.

A row says which tensors are per token and along which dim they are cut, which attentions the group computes,
where the whole output is gathered, and what the split refuses. models/sequence_hooks.py applies any row to a
model for one call with module hooks; the hosts (diffusers_sequence.py, comfy_sequence/) only say how their
model is called and how its attention reaches the group. Adding a family is a row here and a test.

Why a split is exact (every rank holds the whole model and gets the same call): outside attention, a token's
activations depend only on that token and on per-call values, so a rank that runs the per-token layers on its
contiguous shard of each token stream computes exactly those rows of the whole call; attention is exact over
any split (strategies/sequence/shards.py). What is per token (positions, RoPE tables, per-token modulation, a
key mask) must follow the same cut as its tokens. BOTH streams of a joint text + image attention are cut: the
text tokens pass through every block beside the image tokens (Flux.1: 512 of 4608 at 1024 px), so keeping
them whole would leave that share undivided on every rank. Uneven lengths are uneven shards, not padding
(save a stream that a layer cannot take empty: a row's `short`).

The vocabulary (after diffusers' context-parallel plans, `_cp_plan`):
- A site is where something is cut or gathered: "" (the call's own inputs and output), a module path
  ("blocks.0", "transformer_blocks.*" for every block, "single_blocks.-1"), or a method of the model
  (ComfyUI's `forward_orig`), which is replaced for the call. At a site, an input is named as the module's
  forward names it ("pe.0": item 0 of input `pe`), an output as "return" or "return.<item>". What a row does
  not cut stays whole on every rank (per-call values: timestep embeddings, pooled text, guidance).
- A stream is a named token sequence ("text", "image"): its length is taken from the first tensor cut with
  it, and every later one must have that length. Each rank holds piece r of every stream (`Shards`); a cut or
  gather over a tuple of streams is over their joint sequence, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEXT, IMAGE, VIDEO, TOKENS = "text", "image", "video", "tokens"


@dataclass(frozen=True)
class Cut:
    """A tensor per token of `stream` (a tuple: of the joint sequence of these streams), cut along `dim`. A list
    of such tensors (ControlNet residuals) is cut element by element; None is left alone."""

    stream: str | tuple[str, ...]
    dim: int = 1
    ndim: int | None = None  # only a tensor of this many dims is per token (another layout is per call)
    per_frame: bool = False  # size 1: one value for every token (left whole); else spread over each frame's tokens


@dataclass(frozen=True)
class Gather:
    """The output at `at` is this rank's tokens of `stream` along `dim`: every rank gets the whole of it."""

    at: str
    stream: str | tuple[str, ...]
    dim: int = 1


@dataclass(frozen=True)
class Attend:
    """Each module matching `modules` issues one attention over the joint sequence of `streams` (in its joint
    order), and, where its attribute `also_if` is true, a second over `also`. Every other attention (cross-
    attention to the text, whose keys every rank holds whole) is the host's own."""

    modules: str
    streams: tuple[str, ...]
    also: tuple[str, ...] = ()
    also_if: str = ""


@dataclass(frozen=True)
class Refuse:
    """A split call must not have input `name` at site `at` (None or empty is absent): `what` says what it is."""

    name: str
    what: str
    at: str = ""


@dataclass(frozen=True)
class SequenceSplit:
    """How one family is cut. cuts: site -> {input or output: Cut}; lengths: site -> {input: stream}, an input
    set to the stream's whole length (the model would compute it from its shard); key_masks: call input ->
    stream, a mask over that stream's keys (True or nonzero: the key takes part), taken from the model and
    given to the group's attention; short: stream -> "pad" (padded to one token per rank, the pads masked as
    keys) or "refuse", for a stream with fewer tokens than ranks (a layer that cannot take an empty shard);
    refuse_model: (attribute, what) pairs, a model whose attribute is true is refused; classes: the only model
    classes split (by name); when: the row applies to a model whose attribute at this path is true (a host
    version's variant; rows are tried in order); processor: diffusers' attention processor that calls torch's
    attention itself and is swapped for the group's (else diffusers' dispatcher is routed)."""

    label: str
    heads: str  # attribute path to the attention heads (what ulysses must divide)
    attend: tuple[Attend, ...]
    gather: Gather
    cuts: dict = field(default_factory=dict)
    lengths: dict = field(default_factory=dict)
    refuse: tuple[Refuse, ...] = ()
    key_masks: dict = field(default_factory=dict)
    short: dict = field(default_factory=dict)
    refuse_model: tuple[tuple[str, str], ...] = ()
    classes: tuple[str, ...] = ()
    when: str = ""
    processor: str = ""


# diffusers' transformers: called with keywords (hidden_states, timestep, encoder_hidden_states, extras).
DIFFUSERS = {
    "flux": (SequenceSplit(
        "Flux.1", "config.num_attention_heads",
        attend=(Attend("transformer_blocks.*.attn", (TEXT, IMAGE)),
                Attend("single_transformer_blocks.*.attn", (TEXT, IMAGE))),
        gather=Gather("", IMAGE),
        cuts={"": {"hidden_states": Cut(IMAGE), "encoder_hidden_states": Cut(TEXT), "img_ids": Cut(IMAGE, -2),
                   "txt_ids": Cut(TEXT, -2), "controlnet_block_samples": Cut(IMAGE),
                   "controlnet_single_block_samples": Cut(IMAGE)}}),),
    # Latents are patchified by a convolution over the whole clip (one linear per token): cut after it.
    "wan": (SequenceSplit(
        "Wan", "config.num_attention_heads",
        attend=(Attend("blocks.*.attn1", (VIDEO,)),),
        gather=Gather("proj_out", VIDEO),
        cuts={"": {"timestep": Cut(VIDEO, ndim=2)},  # Wan 2.2 TI2V: a timestep per token
              "blocks.0": {"hidden_states": Cut(VIDEO)},
              "rope": {"return.0": Cut(VIDEO), "return.1": Cut(VIDEO)}}),),
    # RoPE: an image table and a text table from the whole text length; the edit models' modulate_index is per
    # image token. diffusers' Qwen RoPE cannot take an empty shard: a short text is padded, few image tokens refused.
    "qwen_image": (SequenceSplit(
        "Qwen-Image", "config.num_attention_heads",
        attend=(Attend("transformer_blocks.*.attn", (TEXT, IMAGE)),),
        gather=Gather("", IMAGE),
        cuts={"": {"hidden_states": Cut(IMAGE), "encoder_hidden_states": Cut(TEXT),
                   "controlnet_block_samples": Cut(IMAGE)},
              "pos_embed": {"return.0": Cut(IMAGE, 0), "return.1": Cut(TEXT, 0)},
              "transformer_blocks.*": {"modulate_index": Cut(IMAGE)}},
        lengths={"pos_embed": {"max_txt_seq_len": TEXT}},
        key_masks={"encoder_hidden_states_mask": TEXT}, short={TEXT: "pad", IMAGE: "refuse"}),),
    # Positions are an absolute table pos_embed adds while it patchifies: its output is cut. SD3.5's dual
    # attention blocks have a second, image-only self-attention (attn2).
    "sd3": (SequenceSplit(
        "SD3", "config.num_attention_heads",
        attend=(Attend("transformer_blocks.*.attn", (IMAGE, TEXT)), Attend("transformer_blocks.*.attn2", (IMAGE,))),
        gather=Gather("proj_out", IMAGE),
        cuts={"": {"encoder_hidden_states": Cut(TEXT), "block_controlnet_hidden_states": Cut(IMAGE)},
              "pos_embed": {"return": Cut(IMAGE)}},
        processor="JointAttnProcessor2_0"),),
}

# ComfyUI's diffusion models: called as BaseModel does, model(x, t, context=..., **extras). Every attention goes
# through ComfyUI's optimized_attention, whose override the host sets; the marked modules are those issuing the
# token-mixing attentions.
CONTROL = Refuse("control", "ControlNet residuals (added to tokens by position)")
ZERO_TIMESTEP = "reference latents on a zero timestep"


def _flux(label: str) -> tuple[SequenceSplit, ...]:
    return (SequenceSplit(
        label, "num_heads",
        attend=(Attend("double_blocks.*", (TEXT, IMAGE)), Attend("single_blocks.*", (TEXT, IMAGE))),
        gather=Gather("forward_orig", IMAGE),
        cuts={"forward_orig": {"img": Cut(IMAGE), "img_ids": Cut(IMAGE), "txt": Cut(TEXT), "txt_ids": Cut(TEXT)}},
        refuse=(CONTROL, Refuse("attention_mask", "an attention mask"),
                Refuse("attn_mask", "an attention mask", "forward_orig"),
                Refuse("timestep_zero_index", ZERO_TIMESTEP, "forward_orig"))),)


def _hunyuan_video(streams: tuple[str, str], gather: Gather, when: str = "") -> SequenceSplit:
    """HunyuanVideo 1.0 / 1.5; the text refiner runs before the cut, on every rank, on the whole prompt."""
    blocks = ("double_blocks.*", "single_blocks.*")
    return SequenceSplit(
        "HunyuanVideo", "num_heads", attend=tuple(Attend(b, streams) for b in blocks), gather=gather,
        cuts={"double_blocks.0": {"txt": Cut(TEXT), "img": Cut(VIDEO)},
              **{b: {"pe": Cut(streams, 2)} for b in blocks}},
        refuse=(CONTROL, Refuse("ref_latent", "a reference latent"), Refuse("guiding_frame_index", "a guiding frame"),
                *(Refuse(name, "per-token modulation", b) for b in blocks
                  for name in ("modulation_dims", "modulation_dims_img", "modulation_dims_txt"))),
        when=when)


COMFY = {
    "flux": _flux("Flux"),
    "chroma": _flux("Chroma"),
    "sd3": (SequenceSplit(
        "SD3 / SD3.5 (MMDiT)", "joint_blocks.0.x_block.attn.num_heads",
        attend=(Attend("joint_blocks.*", (TEXT, IMAGE), also=(IMAGE,), also_if="x_block.x_block_self_attn"),),
        gather=Gather("forward_core_with_concat", IMAGE),
        cuts={"forward_core_with_concat": {"x": Cut(IMAGE), "context": Cut(TEXT)}},
        refuse=(CONTROL,), refuse_model=(("register_length", "register tokens"),)),),
    "qwen_image": (SequenceSplit(
        "Qwen-Image", "transformer_blocks.0.attn.heads",
        attend=(Attend("transformer_blocks.*", (TEXT, IMAGE)),),
        gather=Gather("proj_out", IMAGE),
        cuts={"transformer_blocks.0": {"encoder_hidden_states": Cut(TEXT), "hidden_states": Cut(IMAGE)},
              "transformer_blocks.*": {"image_rotary_emb": Cut((TEXT, IMAGE), 2)}},
        refuse=(CONTROL, Refuse("attention_mask", "a text attention mask"),
                Refuse("encoder_hidden_states_mask", "a text attention mask", "transformer_blocks.*"),
                Refuse("timestep_zero_index", ZERO_TIMESTEP, "transformer_blocks.*"))),),
    # v0.8 joins [video, text] and slices the video out of the last block by its whole count: gather that
    # block's joint output there; later versions join [text, video] and slice by the (local) text count.
    "hunyuan_video": (_hunyuan_video((VIDEO, TEXT), Gather("single_blocks.-1", (VIDEO, TEXT)),
                                     when="double_blocks.0.flipped_img_txt"),
                      _hunyuan_video((TEXT, VIDEO), Gather("final_layer", VIDEO))),
    # The caption and noise refiners run inside patchify_and_embed, before the cut, on every rank; what it
    # returns (the joint [caption, image] sequence and its RoPE table) is cut as one stream.
    "lumina": (SequenceSplit(
        "Lumina 2 / Z-Image", "n_heads",
        attend=(Attend("layers.*.attention", (TOKENS,)),),
        gather=Gather("final_layer", TOKENS),
        cuts={"patchify_and_embed": {"return.0": Cut(TOKENS), "return.4": Cut(TOKENS)}},
        refuse=(CONTROL, Refuse("ref_latents", "reference latents"),
                Refuse("return.1", "a token mask", "patchify_and_embed"),
                Refuse("return.5", ZERO_TIMESTEP, "patchify_and_embed"))),),
    # Each block's RoPE table and per-token (Wan 2.2 5B: per-frame) modulation follow the tokens; the
    # cross-attention to the text attends locally, all its keys on every rank.
    "wan": (SequenceSplit(
        "Wan 2.1 / 2.2", "num_heads",
        attend=(Attend("blocks.*.self_attn", (VIDEO,)),),
        gather=Gather("head", VIDEO),
        cuts={"blocks.0": {"x": Cut(VIDEO)},
              "blocks.*": {"freqs": Cut(VIDEO), "e": Cut(VIDEO, per_frame=True)},
              "head": {"e": Cut(VIDEO, ndim=3, per_frame=True)}},
        refuse=(CONTROL,)),),
    # RoPE tables have the tokens on dim -2 in both layouts ((B, L, D) and split heads (B, H, L, D)); the output
    # norm's result is gathered because the final modulation reads the whole per-token timestep.
    "ltxv": (SequenceSplit(
        "LTX-Video", "num_attention_heads",
        attend=(Attend("transformer_blocks.*.attn1", (VIDEO,)),),
        gather=Gather("norm_out", VIDEO),
        cuts={"transformer_blocks.0": {"x": Cut(VIDEO)},
              "transformer_blocks.*": {"pe.0": Cut(VIDEO, -2), "pe.1": Cut(VIDEO, -2),
                                       "timestep": Cut(VIDEO, per_frame=True)}},
        refuse=(CONTROL, Refuse("self_attention_mask", "a self-attention mask", "transformer_blocks.*")),
        classes=("LTXVModel",)),),
}
