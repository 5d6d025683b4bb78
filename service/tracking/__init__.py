"""MLflow tracking: which store (``uri``), one run's lifecycle (``run``), the driver-side run
setup and secret redaction (``runs``), buffered/retried metric logging (``logger``), plots.

Importing this package is light: MLflow is imported inside the functions that talk to it, and
nothing here imports Ray.
"""

from service.tracking.logger import FlushReport, MetricLogger, MetricValueError
from service.tracking.plots import (
    baseline_comparison_figure,
    embeddings_figure,
    plot_baseline_comparison,
    plot_embeddings,
    plot_training_curves,
    project_2d,
    training_curves_figure,
    user_epochs,
)
from service.tracking.run import (
    EPOCH_KEY_METRIC,
    TrackedRun,
    backfill_epochs,
    ending_on_error,
    log_epoch,
    mlflow_client,
    open_run,
    tracked_run,
)
from service.tracking.runs import (
    CONFIG_ARTIFACT,
    REDACTED,
    RunStatusError,
    end_run,
    get_or_create_experiment,
    git_commit,
    log_params,
    looks_secret,
    redact_secrets,
    redact_tree,
    run_tags,
    secret_values,
    start_pretrain_run,
    stringify_params,
)
from service.tracking.uri import (
    TrackingUnavailableError,
    check_tracking_server,
    default_artifact_location,
    fast_fail_http,
    is_http_uri,
    redact_uri,
    resolve_tracking_uri,
    use_tracking_uri,
)

__all__ = [
    "baseline_comparison_figure",
    "embeddings_figure",
    "plot_baseline_comparison",
    "training_curves_figure",
    "user_epochs",
    "CONFIG_ARTIFACT",
    "EPOCH_KEY_METRIC",
    "REDACTED",
    "FlushReport",
    "MetricLogger",
    "MetricValueError",
    "RunStatusError",
    "TrackedRun",
    "TrackingUnavailableError",
    "backfill_epochs",
    "check_tracking_server",
    "default_artifact_location",
    "end_run",
    "ending_on_error",
    "fast_fail_http",
    "get_or_create_experiment",
    "git_commit",
    "is_http_uri",
    "log_epoch",
    "log_params",
    "looks_secret",
    "mlflow_client",
    "open_run",
    "plot_embeddings",
    "plot_training_curves",
    "project_2d",
    "redact_secrets",
    "redact_tree",
    "redact_uri",
    "resolve_tracking_uri",
    "run_tags",
    "secret_values",
    "start_pretrain_run",
    "stringify_params",
    "tracked_run",
    "use_tracking_uri",
]
