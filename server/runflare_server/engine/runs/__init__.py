"""The two kinds of run: program runs on Run-Flare kernels, kernel runs on fresh sandboxed kernels; the language table."""
