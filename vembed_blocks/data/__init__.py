"""Data blocks: records, images, collators, the weighted task sampler, embedding stores."""
