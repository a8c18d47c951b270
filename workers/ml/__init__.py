"""PyTorch building blocks: architectures, datasets, the training loop, model bundles."""
