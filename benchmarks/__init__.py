"""Speed and quality benchmarks of the exported artifacts against the PyTorch reference and peers."""
