"""Settings conventions every role shares: the FLEXLORA_ environment prefix and a guard against typos in it.

pydantic-settings reads only the variables it knows and silently ignores the rest, so a misspelt
FLEXLORA_RANKK would leave a device training at the default rank. Roles share one environment in
compose (one .env for aggregators and clients), so each accepts every role's names and refuses the rest.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from broker.tls import TlsFiles

ENV_PREFIX = "FLEXLORA_"

# Every setting of every role (tests check this against the settings classes), plus the few variables
# read outside them.
KNOWN_NAMES = frozenset(
    {
        # both roles
        "broker_url",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "federation",
        "heartbeat_s",
        "metrics_port",
        "chunk_bytes",
        "scaling",
        "alpha_factor",
        "learning_rate",
        "schedule",
        "warmup_steps",
        # aggregator
        "redis_url",
        "max_updates",
        "min_updates",
        "round_deadline_s",
        "lease_s",
        "prefetch",
        "strategy",
        "svd_mode",
        "weighting",
        "staleness_exponent",
        "max_staleness",
        "keep_versions",
        "max_update_bytes",
        "transfer_expiry_s",
        "hold_bytes",
        "payload_store",
        "fold_bytes",
        "payload_fsync",
        "min_replicas",
        "replica_timeout_s",
        "min_rank",
        "max_rank",
        "max_update_norm",
        "norm_outlier_factor",
        "max_weight_share",
        "max_transfers_per_client",
        "max_transfers",
        "carry_residual",
        "server_lr",
        "global_rank",
        "require_identity",
        "signing_keys",
        "dp_clip_norm",
        "dp_noise_multiplier",
        "dp_population",
        "dp_delta",
        "dp_epsilon_budget",
        "dp_weight_cap",
        # edge client
        "client_id",
        "model",
        "rank_schedule",
        "rank_pattern",
        "rank",
        "lora_alpha",
        "target_modules",
        "tasks",
        "data",
        "samples_per_task",
        "local_steps",
        "batch_size",
        "seed",
        "rounds",
        "adapter_timeout_s",
        "state_dir",
        "eval_examples",
        "signing_key",
        # read directly: the model cache, the services' log options, and the test suite's service addresses
        "cache",
        "log_format",
        "verbose",
        "test_amqp_url",
        "test_redis_url",
    }
)


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise ValueError naming every FLEXLORA_* variable that no role knows, with the likely intended one."""
    environ = os.environ if environ is None else environ
    problems = []
    for key in sorted(environ):
        if not key.upper().startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in KNOWN_NAMES:
            continue
        guess = difflib.get_close_matches(name, sorted(KNOWN_NAMES), n=1)
        hint = f" (did you mean {ENV_PREFIX}{guess[0].upper()}?)" if guess else ""
        problems.append(f"{key} is not a setting{hint}")
    if problems:
        raise ValueError("; ".join(problems))


class FlexloraSettings(BaseSettings):
    """Base of every role's settings: FLEXLORA_ variables, unknown keys and misspelt variables refused."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # TLS of every connection this role makes (amqps://, and rediss:// for aggregators; broker.tls).
    tls_ca_file: Path | None = Field(default=None, description="CA (PEM) that signs the servers' certificates")
    tls_cert_file: Path | None = Field(default=None, description="this process's certificate (PEM): mutual TLS")
    tls_key_file: Path | None = Field(default=None, description="its private key (PEM), unless in tls_cert_file")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_environment(cls, data: object) -> object:
        check_environment()
        return data

    @model_validator(mode="after")
    def _tls_files_usable(self) -> FlexloraSettings:
        self.tls_files()
        return self

    def tls_files(self) -> TlsFiles | None:
        """The TLS files given (None when none is: the system's CAs verify amqps:// and rediss:// servers)."""
        from broker.tls import TlsFiles

        if self.tls_ca_file is None and self.tls_cert_file is None and self.tls_key_file is None:
            return None
        return TlsFiles(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
