"""The sandbox: policy, seccomp, cgroups, network, the launchers, and the programs that run inside it."""
