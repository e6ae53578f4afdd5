"""Fused forward/backward paths (torch autograd Functions). Each one is proven against the plain path in tests."""
