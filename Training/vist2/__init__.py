"""PyTorch reference implementation of VIST2 (see docs/MODEL.md, and README.md here)."""
