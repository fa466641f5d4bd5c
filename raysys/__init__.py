"""raysys: learning from populations of neural networks (model zoos) on Ray."""
__version__ = "0.1.0"
