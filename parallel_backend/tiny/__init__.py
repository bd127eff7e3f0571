"""The embedded default model: a small text-to-image latent diffusion model of handwritten digits.

Trained by `python -m parallel_backend.tiny.train` on scikit-learn's bundled digits; its weights ship in
`weights/`. Pixels 32x32 (the data set's 8x8 upsampled), latents 4x8x8, SD1.5's noise schedule.
"""
