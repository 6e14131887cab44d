"""The engine the service uses: program runs on Run-Flare kernels, kernel runs on fresh sandboxed kernels."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ..config import Settings
from .incidents import incident
from .interface import Emit, LanguageInfo, RunRequest, RunResult

log = logging.getLogger(__name__)
KERNEL_RUN_BASE = 1000  # kernel-run ids are 1000 + the Judge0 id


class KernelEngine:
    """Dispatches each run to the program-run pool or the kernel-run pools."""

    def __init__(self, settings: Settings):
        from runflare_server.engine.runs.kernel_runs import KernelRuns
        from runflare_server.engine.runs.program_runs import ProgramRuns

        self.sandbox = settings.sandbox
        self.allow_network = settings.allow_enable_network
        self.policy: dict[str, Any] = {"identity": "none (sandbox disabled)"}
        # The sandbox uid range travels to the Run-Flare kernels (and anything else the engine starts).
        os.environ["RUNFLARE_SANDBOX_UIDS"] = settings.sandbox_uids

        self.program_runs = ProgramRuns(size=settings.workers or os.cpu_count() or 1, sandbox_mode=settings.sandbox,
                                        max_output_bytes=settings.max_output_size)
        self.kernel_runs = KernelRuns(pool_sizes=settings.kernel_pool, sandbox=settings.sandbox,
                                      extra_ids=settings.kernel_language_ids, max_output_bytes=settings.max_output_size,
                                      pool_max=settings.kernel_pool_max)

    async def start(self) -> None:
        from runflare_server.engine.sandbox import scratch
        from runflare_server.engine.sandbox.cgroups import sweep_stale
        from runflare_server.engine.sandbox.policy import check

        if self.sandbox != "none":
            # says clearly what is wrong; what is in force goes to /health
            self.policy = await asyncio.get_running_loop().run_in_executor(None, check, self.sandbox)
        if self.allow_network:
            from runflare_server.engine.sandbox import network

            network.prepare_tun()  # pasta runs as the slot uid
        sweep_stale()  # groups a killed server left behind
        scratch.sweep_stale()  # and its run dirs, kernel runtime dirs, ipc dirs and connection files
        await asyncio.gather(self.program_runs.start(), self.kernel_runs.start())

    async def stop(self) -> None:
        await asyncio.gather(self.program_runs.stop(), self.kernel_runs.stop(), return_exceptions=True)

    def languages(self) -> list[LanguageInfo]:
        return [*self.program_runs.languages(), *self.kernel_runs.languages()]

    def kernelspecs(self) -> list[str]:
        return self.kernel_runs.kernelspecs()

    def is_kernel_run(self, request: RunRequest) -> bool:
        return request.kernel is not None or (request.language_id or 0) >= KERNEL_RUN_BASE

    async def run(self, request: RunRequest, emit: Emit) -> RunResult:
        pool = self.kernel_runs if self.is_kernel_run(request) else self.program_runs
        try:
            return await pool.run(request, emit)
        except Exception as e:  # noqa: BLE001 - the details go to the log, never to the submitter
            return RunResult("internal", message=incident(log, "the run failed on the server", exc=e,
                                                          detail=request.token))

    def health(self) -> dict[str, Any]:
        return {"program_runs": self.program_runs.health(), "kernel_runs": self.kernel_runs.health(),
                "sandbox_policy": self.policy}


def detect_languages() -> list[LanguageInfo]:
    """The program-run languages this machine can run, without starting any kernel."""
    from runflare_server.engine.runs import languages

    return sorted(languages.language_infos(), key=lambda lang: lang.name.lower())


def install_kernelspecs(prefix: str | None = None) -> list[str]:
    """Install the Run-Flare kernelspecs (one per program language) and the bash and Deno kernels."""
    from runflare_server.engine.runs.kernel_runs import install_kernelspecs as install_third_party

    from ..kernels.install import install_kernelspecs as install_runflare

    return [*install_runflare(prefix), *install_third_party()]
