"""PyTorch reference implementation of VIST2 (see ../../shared docs VIST2.md, and README.md here)."""
