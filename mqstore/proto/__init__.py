"""Generated gRPC code (see proto/generate.py). Do not edit."""
