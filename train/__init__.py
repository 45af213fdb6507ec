"""orca2.train: tokenisation with assistant-only loss masks, packing, the DeepSpeed SFT loop, the fused loss."""
