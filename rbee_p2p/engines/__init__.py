"""Local inference engines behind one interface (llama-cpp-python, diffusers, a scripted fake)."""
