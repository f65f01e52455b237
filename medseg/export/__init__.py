"""Export: TorchScript module and model card."""
