"""Models: loading per family into a frozen `Components`, encode/decode, the U-Net call protocol, LoRA."""
