"""Converting OpenAI's PyTorch CLIP checkpoints without torch: the pickle
reader that runs no pickle code, and the weight mapping."""
