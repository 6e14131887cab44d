"""The Run-Flare kernel: program runs (compile + run each cell in a fresh sandbox), served over Jupyter's protocol."""
