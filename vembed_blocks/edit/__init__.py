"""The seed-004 wing: Qwen-Image-Edit prompt embeddings and edit-model fine-tuning (the ``edit`` extra).

- `flow_matching`: timesteps, noisy latents, flow targets, loss weighting, packed latents (torch only)
- `prompts`: prompt embeddings exactly as the diffusers pipeline's ``encode_prompt`` computes them (diffusers)
- `rows`: the extracted edit rows (embedding stores + images) as training rows and VAE latents

Import the module you need (``from vembed_blocks.edit import flow_matching``); this package imports nothing.
"""
