"""Launch the Run-Flare kernel: ``python -m runflare_server.kernels -f CONNECTION_FILE``."""

from runflare_server.kernels.runflare_kernel import main

main()
