"""Kernels through jupyter_client: the runflare-sandbox provisioner, pools, the fork server, kernelspecs, per-family adapters."""
