"""Where attnswap meets transformers: the mask and the attention entry it registers, swap, save and load, models and
their sources, the bounded cache and the decode loop."""
