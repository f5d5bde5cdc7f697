"""The seed-004 wing: Qwen-Image-Edit prompt embeddings and edit-model fine-tuning (the ``edit`` extra).

- `flow_matching`: timesteps, noisy latents, flow targets, loss weighting, packed latents (torch only)
- `prompts`: prompt embeddings exactly as the diffusers pipeline's ``encode_prompt`` computes them (diffusers)
- `rows`: the extracted edit rows (embedding stores + images) as training rows and VAE latents
- `records`: the seed-004 edit format read as records (`vembed_blocks.data.records.read_records` hands
  edit rows here; standard library only)

Import the module you need (``from vembed_blocks.edit import flow_matching``); this package imports nothing.
Only `prompts` needs diffusers, imported inside the functions that load a pipeline: without it they
raise an ImportError naming the ``edit`` extra.
"""
