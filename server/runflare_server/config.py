"""Server settings: defaults, maxima and switches, from arguments and RUNFLARE_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """The per-user data dir (~/.local/share/runflare on Linux)."""
    return Path(platformdirs.user_data_dir("runflare"))


class Settings(BaseSettings):
    """Every setting of a Run-Flare server. Environment: RUNFLARE_<NAME>; lists and maps as JSON."""

    model_config = SettingsConfigDict(env_prefix="RUNFLARE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8787
    data_dir: Path = Field(default_factory=default_data_dir)
    role: Literal["all", "api", "worker"] = "all"
    # Where submissions live and how work and events travel. Defaults: SQLite in data_dir, the in-process
    # queue. Scale-out: postgresql://... and redis://..., shared by every api and worker process.
    store: str = ""  # sqlite:///PATH or postgresql://USER@HOST/DB; empty: data_dir/runflare.sqlite3
    broker: str = "memory"  # memory or redis://HOST:PORT/DB
    broker_prefix: str = "runflare"  # Redis key prefix (one cluster per prefix)
    visibility_timeout: float = 30.0  # a job held this long by a silent (dead) worker goes to another
    max_attempts: int = 3  # a submission whose runs keep killing their worker ends as Internal Error
    reconcile_interval: float = 10.0  # how often workers look for accepted work the broker lost
    sandbox: Literal["auto", "bwrap", "unshare", "none"] = "auto"
    workers: int = 0  # concurrent runs; 0 = number of CPUs
    kernel_pool: dict[str, int] = Field(default_factory=lambda: {"python3": 2})  # ready kernels kept at least
    # ready kernels a busy kernelspec may grow to (never below its kernel_pool entry); None: 4 per core;
    # 0: pools keep their kernel_pool size
    kernel_pool_max: int | None = Field(default=None, ge=0)
    kernel_language_ids: dict[int, str] = Field(default_factory=dict)  # extra id -> kernelspec

    # Auth and CORS.
    auth_tokens: list[str] = Field(default_factory=list)
    authz_users: list[str] = Field(default_factory=list)  # empty: any non-empty X-Auth-User
    cors_origins: list[str] = Field(default_factory=list)  # "*" for any, "null" for pages opened from disk
    # believe X-Real-Ip / X-Forwarded-For and X-Scheme / X-Forwarded-Proto: only behind a proxy that sets them
    # (else any client writes the address the log shows for it)
    trust_xheaders: bool = False

    # Judge0 switches.
    maintenance_mode: bool = False
    enable_wait_result: bool = True
    wait_cap_seconds: float = 60.0
    enable_compiler_options: bool = True
    allowed_languages_for_compile_options: list[int] = Field(default_factory=list)
    enable_command_line_arguments: bool = True
    enable_submission_delete: bool = False
    enable_callbacks: bool = True
    callbacks_max_tries: int = 3
    callbacks_timeout: float = 5.0
    callback_allowed_networks: list[str] = Field(default_factory=list)  # CIDRs callbacks may reach
    enable_additional_files: bool = False
    max_queue_size: int = 100
    enable_batched_submissions: bool = True
    max_submission_batch_size: int = 20
    submission_cache_duration: float = 1.0
    use_docs_as_homepage: bool = False
    allow_enable_network: bool = False
    enable_network: bool = False
    max_extract_size: int = 10240

    # Judge0 limits: defaults and maxima.
    cpu_time_limit: float = 5.0
    max_cpu_time_limit: float = 15.0
    cpu_extra_time: float = 1.0
    max_cpu_extra_time: float = 5.0
    wall_time_limit: float = 10.0
    max_wall_time_limit: float = 20.0
    memory_limit: int = 128000
    max_memory_limit: int = 512000
    stack_limit: int = 64000
    max_stack_limit: int = 128000
    max_processes_and_or_threads: int = 60
    max_max_processes_and_or_threads: int = 120
    enable_per_process_and_thread_time_limit: bool = False
    allow_enable_per_process_and_thread_time_limit: bool = True
    enable_per_process_and_thread_memory_limit: bool = False
    allow_enable_per_process_and_thread_memory_limit: bool = True
    max_file_size: int = 1024
    max_max_file_size: int = 4096
    number_of_runs: int = 1
    max_number_of_runs: int = 20
    redirect_stderr_to_stdout: bool = False

    # The sandbox: host uids for sandboxes ("BASE:COUNT", used when the server runs as root), and the
    # compile step's limits (Limits field -> value), each capped by the maxima above.
    sandbox_uids: str = "1900000000:65536"
    compile_limits: dict[str, float] = Field(default_factory=dict)

    # Run-Flare sizes.
    max_source_size: int = 64 * 1024
    max_stdin_size: int = 1024 * 1024
    max_body_size: int = 32 * 1024 * 1024  # a full batch with large stdins fits
    max_output_size: int = 1024 * 1024
    ws_idle_timeout: float = 3600.0
    ws_ping_interval: float = 20.0
    ws_send_timeout: float = 10.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "runflare.sqlite3"

    @property
    def store_url(self) -> str:
        return self.store or str(self.db_path)

    def config_info(self) -> dict[str, Any]:
        """Every Judge0 /config_info key with this server's effective value."""
        keys = [
            "maintenance_mode", "enable_wait_result", "enable_compiler_options",
            "allowed_languages_for_compile_options", "enable_command_line_arguments",
            "enable_submission_delete", "enable_callbacks", "callbacks_max_tries", "callbacks_timeout",
            "enable_additional_files", "max_queue_size", "cpu_time_limit", "max_cpu_time_limit",
            "cpu_extra_time", "max_cpu_extra_time", "wall_time_limit", "max_wall_time_limit",
            "memory_limit", "max_memory_limit", "stack_limit", "max_stack_limit",
            "max_processes_and_or_threads", "max_max_processes_and_or_threads",
            "enable_per_process_and_thread_time_limit", "allow_enable_per_process_and_thread_time_limit",
            "enable_per_process_and_thread_memory_limit", "allow_enable_per_process_and_thread_memory_limit",
            "max_file_size", "max_max_file_size", "number_of_runs", "max_number_of_runs",
            "redirect_stderr_to_stdout", "max_extract_size", "enable_batched_submissions",
            "max_submission_batch_size", "submission_cache_duration", "use_docs_as_homepage",
            "allow_enable_network", "enable_network",
        ]
        return {key: getattr(self, key) for key in keys}
