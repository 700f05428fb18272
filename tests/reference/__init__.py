"""PyTorch references written from the research specs (/work/shared/research/*.md), for the parity tests.
torch is imported only here and in tests."""
