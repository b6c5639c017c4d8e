"""netshrink: prune and quantize trained PyTorch models, and prove the gains."""
