//! The admin HTTP API (axum): health, readiness, Prometheus metrics, status, rule bundles
//! (read, validate, update with `If-Match`, versions, rollback) and backtests.
//!
//! Rule updates go through a rules control plane ([`RulesPlane`]: the control topic, or one
//! process's versions in memory): a `PUT` validates, publishes and answers once this instance
//! runs the new version (or with 409 when another update got there first). Mutating endpoints take a bearer token when one is configured; bodies are
//! size-limited; every error is JSON with a message a person can act on.
//!
//! What it must not do: score events, touch feature state, or block its runtime (publishing,
//! compiling and backtests run on blocking threads).

pub mod backtest;
pub mod plane;
pub mod telemetry;

pub use plane::{LocalRules, RulesPlane};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use riskstream_common::Secret;
use riskstream_kafka::{LabelStore, Outcome, RulesControl, RulesVersion};
use riskstream_pipeline::{CheckpointHandle, RecentEvents, StatusBoard};
use riskstream_rules::{BundleDoc, BundleError, Problem};
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;

/// The committed OpenAPI document of this API, served at `/api/v1/openapi.yaml`.
pub const OPENAPI: &str = include_str!("../openapi.yaml");

/// Everything the handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The rules control plane, once it is loaded (the API answers before that).
    pub rules: Arc<RulesSlot>,
    pub status: Arc<StatusBoard>,
    pub recent: Arc<RecentEvents>,
    pub labels: Option<Arc<LabelStore>>,
    pub metrics: Option<PrometheusHandle>,
    pub token: Option<Secret>,
    pub instance: String,
    /// The event id field (labels are looked up by it).
    pub event_id: String,
    /// How long a rules update waits for the control topic.
    pub publish_timeout: Duration,
    /// The pipeline's checkpoints (empty until it has recovered, or without checkpoints).
    pub checkpoints: Arc<CheckpointHandle>,
    /// Where checkpoints are stored and under which name, when they are taken.
    pub checkpoint_store: Option<(String, String)>,
}

/// Where the control topic's follower goes once the instance has read the topic: the admin
/// API serves health and readiness before that, and answers rule requests with 503.
#[derive(Debug, Default)]
pub struct RulesSlot(std::sync::OnceLock<Arc<dyn RulesPlane>>);

impl RulesSlot {
    /// A slot already holding `plane`.
    pub fn holding(plane: Arc<dyn RulesPlane>) -> Self {
        let slot = Self::default();
        slot.set(plane);
        slot
    }

    pub fn set(&self, plane: Arc<dyn RulesPlane>) {
        let _ = self.0.set(plane);
    }

    pub fn get(&self) -> Option<&Arc<dyn RulesPlane>> {
        self.0.get()
    }
}

impl AdminState {
    /// The state of an instance configured by `config` whose rules are (or will be) in
    /// `rules`; fails on an admin address other hosts reach without a token (unless
    /// `admin.allow_unauthenticated`) and on an unreadable token file.
    pub fn new(
        config: &riskstream_common::Config,
        rules: Arc<RulesSlot>,
        labels: Option<Arc<LabelStore>>,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, riskstream_common::ConfigError> {
        Ok(AdminState {
            rules,
            status: Arc::new(StatusBoard::new(&config.kafka.topics.transactions)),
            recent: Arc::new(RecentEvents::new(config.admin.backtest_events)),
            labels,
            metrics,
            token: config.admin.checked_token()?,
            instance: instance_id(&config.admin),
            event_id: config.schema.event_id.clone(),
            publish_timeout: config.admin.publish_timeout,
            checkpoints: Arc::new(CheckpointHandle::default()),
            checkpoint_store: config
                .checkpoint_url()
                .map(|url| (url, config.checkpoint_name())),
        })
    }

    /// The rules plane, or 503 while the control topic is still being read.
    fn control(&self) -> Result<Arc<dyn RulesPlane>, ApiError> {
        self.rules.get().cloned().ok_or_else(|| {
            let why = self
                .status
                .snapshot()
                .waiting_for
                .unwrap_or_else(|| "reading the control topic".into());
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "rules_not_loaded",
                format!("the rules are not loaded yet ({why}); see GET /readyz"),
            )
        })
    }
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("instance", &self.instance)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// The API's routes over `state`; bodies above `max_body_bytes` get 413.
pub fn router(state: AdminState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/openapi.yaml", get(openapi))
        .route("/api/v1/status", get(status))
        .route("/api/v1/rules", get(rules).put(put_rules))
        .route("/api/v1/rules/validate", post(validate))
        .route("/api/v1/rules/versions", get(versions))
        .route("/api/v1/rules/versions/{version}", get(version))
        .route("/api/v1/rules/rollback/{version}", post(rollback))
        .route("/api/v1/rules/backtest", post(backtest::handle))
        .route(
            "/api/v1/checkpoints",
            get(list_checkpoints).post(take_checkpoint),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// The admin API running on its own thread and runtime.
#[derive(Debug)]
pub struct AdminServer {
    address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {address} (admin.listen): {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the admin API's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl AdminServer {
    /// Binds `listen` and serves `router` until dropped.
    pub fn start(listen: &str, router: Router) -> Result<Self, AdminError> {
        let listen_error = |source| AdminError::Listen {
            address: listen.to_string(),
            source,
        };
        let std_listener = std::net::TcpListener::bind(listen).map_err(listen_error)?;
        std_listener.set_nonblocking(true).map_err(listen_error)?;
        let address = std_listener.local_addr().map_err(listen_error)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(8)
            .thread_name("admin")
            .enable_all()
            .build()
            .map_err(AdminError::Runtime)?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(listen_error)?
        };
        let thread = std::thread::Builder::new()
            .name("admin-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let served = axum::serve(listener, router)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "admin API stopped");
                    }
                });
            })
            .map_err(AdminError::Runtime)?;
        tracing::info!(%address, "admin API listening");
        Ok(Self {
            address,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The bound address (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An error answer: `{"error": code, "message": …, "problems": [...]?, …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: serde_json::Map::new(),
        }
    }

    fn with(mut self, key: &str, value: impl Serialize) -> Self {
        if let Ok(value) = serde_json::to_value(value) {
            self.extra.insert(key.to_string(), value);
        }
        self
    }

    /// 422 listing every problem of a rejected bundle (each naming its rule or feature).
    pub fn bundle(error: &BundleError) -> Self {
        let first = error
            .problems
            .first()
            .map(Problem::to_string)
            .unwrap_or_default();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_bundle",
            format!(
                "rule bundle rejected ({} problem{}): {first}",
                error.problems.len(),
                if error.problems.len() == 1 { "" } else { "s" }
            ),
        )
        .with("problems", &error.problems)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        body.extend(self.extra);
        (self.status, Json(serde_json::Value::Object(body))).into_response()
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "body_too_large",
                "request body exceeds admin.max_body_bytes; split the bundle or raise the limit",
            )
        } else {
            ApiError::new(status, "bad_body", rejection.body_text())
        }
    }
}

/// Requires `Authorization: Bearer <token>` on every mutating request when a token is set.
async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let mutating = !matches!(*request.method(), Method::GET | Method::HEAD);
    if let (true, Some(token)) = (mutating, &state.token) {
        let offered = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time over the bytes (a different length answers at once; the length of
        // the token is not the secret).
        let matches: bool = offered.as_bytes().ct_eq(token.expose().as_bytes()).into();
        if !matches {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint changes the running system: send `Authorization: Bearer <token>` with the token configured in admin.token or admin.token_file",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// What the instance is still waiting for before it is ready: rules loaded, not halted, state
/// restored, a partition assigned. Empty: ready.
fn waiting_for(state: &AdminState) -> (Vec<String>, Option<u64>) {
    let snapshot = state.status.snapshot();
    let mut waiting = Vec::new();
    let rules_version = state.rules.get().map(|c| c.version());
    if rules_version.is_none() {
        waiting.push(format!(
            "rules are not loaded: {}",
            snapshot
                .waiting_for
                .as_deref()
                .unwrap_or("reading the control topic")
        ));
    }
    if let Some(halted) = &snapshot.halted {
        waiting.push(halted.clone());
    }
    if let Some(p) = &snapshot.restoring {
        waiting.push(format!(
            "restoring feature state from checkpoint {}: {} of {} files, {:.1} of {:.1} MB",
            p.checkpoint,
            p.files,
            p.of_files,
            p.bytes as f64 / 1e6,
            p.of_bytes as f64 / 1e6
        ));
    } else if !snapshot.state_restored {
        waiting.push("feature state is not restored yet".into());
    }
    if !snapshot.partitions.values().any(|p| p.assigned) {
        waiting.push("no source partition is assigned yet".into());
    }
    (waiting, rules_version)
}

/// 200 once state is restored, partitions are assigned and rules are loaded; 503 with what is
/// missing otherwise.
async fn readyz(State(state): State<AdminState>) -> Response {
    let (waiting, rules_version) = waiting_for(&state);
    if waiting.is_empty() {
        Json(json!({"status": "ready", "rules_version": rules_version})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "waiting_for": waiting, "rules_version": rules_version})),
        )
            .into_response()
    }
}

/// The Prometheus exposition; `riskstream_ready` (1 or 0, as `/readyz` would answer) is
/// brought up to date first, so an alert sees readiness without probing `/readyz`.
async fn metrics_text(State(state): State<AdminState>) -> Response {
    if state.metrics.is_some() {
        let ready = waiting_for(&state).0.is_empty();
        metrics::gauge!("riskstream_ready").set(if ready { 1.0 } else { 0.0 });
    }
    match &state.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_disabled",
            "this instance runs without the Prometheus recorder",
        )
        .into_response(),
    }
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        )],
        OPENAPI,
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let rules = state.rules.get().map(|control| {
        let version = control.version();
        let published = control.get(version);
        json!({
            "version": version,
            "published_at_ms": published.as_ref().map(|v| v.published_at),
            "origin": published.as_ref().map(|v| v.origin.clone()),
            "versions": control.versions().len(),
        })
    });
    Json(json!({
        "instance": state.instance,
        "rules": rules,
        "pipeline": state.status.snapshot(),
        "backtest_buffer_events": state.recent.len(),
        "last_checkpoint": state.checkpoints.get().and_then(|(_, c)| {
            let stats = c.stats();
            let latest = stats.latest?;
            Some(json!({
                "id": latest.id,
                "created_at_ms": latest.created_at_ms,
                "age_seconds": stats.latest_at.map(|at| at.elapsed().as_secs_f64()),
                "offsets": latest.offsets,
                "rules_version": latest.rules_version,
                "bytes_total": latest.bytes_total,
            }))
        }),
        "checkpoints": state.checkpoints.get().map(|(_, c)| {
            let stats = c.stats();
            json!({
                "completed": stats.completed,
                "failed": stats.failed,
                "failed_in_a_row": stats.failed_in_a_row,
                "last_failure": stats.last_failure,
                "last_good_age_seconds": c.last_good_age().as_secs_f64(),
            })
        }),
    }))
}

#[derive(Serialize)]
struct VersionSummary {
    version: u64,
    published_at_ms: i64,
    origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
}

impl From<&RulesVersion> for VersionSummary {
    fn from(v: &RulesVersion) -> Self {
        Self {
            version: v.version,
            published_at_ms: v.published_at,
            origin: v.origin.clone(),
            comment: v.comment.clone(),
        }
    }
}

/// A version in full: its summary, the document as submitted and as parsed.
fn version_body(v: &RulesVersion) -> serde_json::Value {
    // Parsed only: every stored version compiled when it applied.
    let document = BundleDoc::parse(&v.bundle)
        .ok()
        .and_then(|doc| serde_json::to_value(doc).ok());
    json!({
        "version": v.version,
        "published_at_ms": v.published_at,
        "origin": v.origin,
        "comment": v.comment,
        "bundle": v.bundle,
        "document": document,
    })
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

async fn rules(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let control = state.control()?;
    blocking(move || {
        let version = control.version();
        let v = control.get(version).ok_or_else(|| {
            ApiError::internal(format!("running version {version} is not in the history"))
        })?;
        let mut response = Json(version_body(&v)).into_response();
        response.headers_mut().insert(header::ETAG, etag(version));
        Ok(response)
    })
    .await
}

async fn versions(State(state): State<AdminState>) -> Result<Json<serde_json::Value>, ApiError> {
    let control = state.control()?;
    let versions: Vec<VersionSummary> = control
        .versions()
        .iter()
        .map(|v| VersionSummary::from(v.as_ref()))
        .collect();
    Ok(Json(
        json!({"current": control.version(), "versions": versions}),
    ))
}

async fn version(
    State(state): State<AdminState>,
    Path(number): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let control = state.control()?;
    blocking(move || match control.get(number) {
        Some(v) => Ok(Json(version_body(&v))),
        None => Err(unknown_version(number, control.version())),
    })
    .await
}

fn unknown_version(number: u64, current: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_version",
        format!("rules version {number} does not exist; versions run from 1 to {current} (GET /api/v1/rules/versions)"),
    )
}

/// The bundle text of a request body.
fn bundle_text(body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    let body = body?;
    String::from_utf8(body.to_vec()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("the rule bundle must be UTF-8 YAML or JSON: {e}"),
        )
    })
}

/// The version named by `If-Match` (`"3"`, `3` or `W/"3"`).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse::<u64>().map(Some).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_if_match",
            format!("If-Match must name the rules version the update replaces (e.g. `If-Match: \"3\"`), not `{text}`"),
        )
    })
}

async fn validate(
    State(state): State<AdminState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let text = bundle_text(body)?;
    let control = state.control()?;
    blocking(move || match control.validate(&text) {
        Ok(compiled) => Ok(Json(json!({
            "valid": true,
            "rules": compiled.doc().rules.len(),
            "features": compiled.doc().features.len(),
        }))),
        Err(e) => Err(ApiError::bundle(&e)),
    })
    .await
}

async fn put_rules(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let text = bundle_text(body)?;
    let Some(expected) = if_match(&headers)? else {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_REQUIRED,
            "if_match_required",
            format!(
                "send `If-Match: \"{}\"` (the version you are replacing, see GET /api/v1/rules) so that concurrent edits cannot overwrite each other",
                state.control()?.version()
            ),
        ));
    };
    let comment = headers
        .get("x-rules-comment")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    publish(&state, text, expected, comment).await
}

async fn rollback(
    State(state): State<AdminState>,
    Path(number): Path<u64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let control = state.control()?;
    let Some(old) = control.get(number) else {
        return Err(unknown_version(number, control.version()));
    };
    let expected = if_match(&headers)?.unwrap_or_else(|| control.version());
    let comment = Some(format!("rollback to version {number}"));
    publish(&state, old.bundle.clone(), expected, comment).await
}

/// Publishes `text` to replace `expected` (the control checks it first) and answers with the
/// outcome.
async fn publish(
    state: &AdminState,
    text: String,
    expected: u64,
    comment: Option<String>,
) -> Result<Response, ApiError> {
    let control = state.control()?;
    let timeout = state.publish_timeout;
    blocking(move || {
        let outcome = control
            .publish(&text, expected, comment, timeout)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "control_topic",
                    e.to_string(),
                )
            })?;
        match outcome {
            Outcome::Applied(version) => {
                let mut response =
                    Json(json!({"version": version, "replaced": expected})).into_response();
                response.headers_mut().insert(header::ETAG, etag(version));
                Ok(response)
            }
            Outcome::Conflict { expected, current } => Err(conflict(expected, current)),
            Outcome::Rejected(e) => Err(ApiError::bundle(&e)),
        }
    })
    .await
}

fn conflict(expected: u64, current: u64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "stale_version",
        format!("the update replaces version {expected}, but version {current} is running now; GET /api/v1/rules, reapply your change to it and send If-Match: \"{current}\""),
    )
    .with("expected", expected)
    .with("current", current)
}

fn checkpoints_off() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "checkpoints_off",
        "this instance takes no checkpoints: set checkpoint.url (or state.dir) and restart",
    )
}

/// `GET /api/v1/checkpoints`: every stored checkpoint of this instance, newest first.
async fn list_checkpoints(
    State(state): State<AdminState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some((url, name)) = state.checkpoint_store.clone() else {
        return Err(checkpoints_off());
    };
    let listed = tokio::task::spawn_blocking(move || {
        let store = riskstream_checkpoint::CheckpointStore::open(&url, &name)?;
        Ok::<_, riskstream_checkpoint::CheckpointError>((
            store.location().to_string(),
            store.list()?,
        ))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "checkpoint_storage",
            e.to_string(),
        )
    })?;
    let (location, listed) = listed;
    let checkpoints: Vec<_> = listed.iter().map(checkpoint_json).collect();
    Ok(Json(
        json!({ "location": location, "checkpoints": checkpoints }),
    ))
}

/// One listed checkpoint as the API shows it.
pub fn checkpoint_json(l: &riskstream_checkpoint::Listed) -> serde_json::Value {
    match &l.manifest {
        Ok(m) => {
            let mut shown = manifest_json(m);
            shown["complete"] = true.into();
            shown["committed"] = l.committed.into();
            shown
        }
        Err(problem) => json!({ "id": l.id, "complete": false, "problem": problem }),
    }
}

/// A checkpoint's manifest as the API shows it (its file list counted, not listed).
fn manifest_json(m: &riskstream_checkpoint::Manifest) -> serde_json::Value {
    json!({
            "id": m.id,
            "created_at_ms": m.created_at_ms,
            "delivery": m.delivery,
            "offsets": m.offsets,
            "max_event_times": m.max_event_times,
            "rules_version": m.rules_version,
            "files": m.files.len(),
            "bytes_total": m.bytes_total,
            "bytes_uploaded": m.bytes_uploaded,
            "files_uploaded": m.files_uploaded,
            "files_reused": m.files_reused,
            "sync_ms": m.sync_ms,
            "duration_ms": m.duration_ms,
    })
}

/// `POST /api/v1/checkpoints`: takes a checkpoint at the next batch boundary and answers once
/// it exists (201, its manifest) or after `publish_timeout` (202: still on its way).
async fn take_checkpoint(State(state): State<AdminState>) -> Result<Response, ApiError> {
    let Some((requests, checkpointer)) = state.checkpoints.get() else {
        return Err(checkpoints_off());
    };
    let after = checkpointer.stats().latest.map_or(0, |m| m.id);
    requests.request();
    let checkpointer = checkpointer.clone();
    let timeout = state.publish_timeout.max(Duration::from_secs(30));
    let waited = tokio::task::spawn_blocking(move || checkpointer.wait(after + 1, timeout))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match waited {
        Ok(m) => Ok((StatusCode::CREATED, Json(manifest_json(&m))).into_response()),
        Err(riskstream_checkpoint::CheckpointError::Timeout { .. }) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "message": "the checkpoint is requested and not complete yet (no batch since, or still uploading); GET /api/v1/checkpoints shows it once it exists" })),
        )
            .into_response()),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "checkpoint_failed", e.to_string())),
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint {method} {uri}; see GET /api/v1/openapi.yaml"),
    )
}

/// Runs `f` where blocking is allowed.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request handler failed: {e}")))?
}

/// An instance's admin API before its rules are loaded: health, readiness (not ready, saying
/// what it waits for), metrics and status answer; rule endpoints answer 503.
#[derive(Debug)]
pub struct AdminPlane {
    state: AdminState,
    server: AdminServer,
    config: riskstream_common::KafkaConfig,
    compiler: riskstream_rules::RuleCompiler,
}

/// An instance's control plane: the control topic follower, the status board and recent-event
/// buffer the pipeline reports to, and the admin API serving them.
#[derive(Debug)]
pub struct ControlPlane {
    pub control: Arc<RulesControl>,
    pub status: Arc<StatusBoard>,
    pub recent: Arc<RecentEvents>,
    /// Filled by the pipeline once it has recovered.
    pub checkpoints: Arc<CheckpointHandle>,
    server: AdminServer,
}

/// The control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    Control(#[from] riskstream_kafka::ControlError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Config(#[from] riskstream_common::ConfigError),
    #[error(transparent)]
    Schema(#[from] riskstream_common::SchemaError),
}

impl AdminPlane {
    /// Serves the admin API on `admin.listen`, before anything else is up. Refuses an address
    /// other hosts can reach without a token (unless `admin.allow_unauthenticated`).
    pub fn open(
        config: &riskstream_common::Config,
        labels: Option<Arc<LabelStore>>,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, ControlPlaneError> {
        let compiler = riskstream_rules::RuleCompiler::new(&config.event_schema()?);
        let state = AdminState::new(config, Arc::new(RulesSlot::default()), labels, metrics)?;
        if state.token.is_none() {
            if config.admin.listens_on_loopback_only() {
                tracing::warn!(listen = %config.admin.listen, "no admin token configured: rule updates are open to every process on this host");
            } else {
                tracing::warn!(listen = %config.admin.listen, "admin.allow_unauthenticated = true: rule updates are open to anyone who reaches the admin API");
            }
        }
        let server = AdminServer::start(
            &config.admin.listen,
            router(state.clone(), config.admin.max_body_bytes),
        )?;
        Ok(Self {
            state,
            server,
            config: config.kafka.clone(),
            compiler,
        })
    }

    /// Where the admin API listens.
    pub fn address(&self) -> SocketAddr {
        self.server.address()
    }

    /// The status board (what `/readyz` and `/api/v1/status` report).
    pub fn status(&self) -> &Arc<StatusBoard> {
        &self.state.status
    }

    /// The events kept for backtests (the pipeline reports to it).
    pub fn recent(&self) -> Arc<RecentEvents> {
        Arc::clone(&self.state.recent)
    }

    /// Reads the control topic (seeding it with `seed` when empty), waiting for the cluster
    /// as long as it takes and reporting why on `/readyz`. `None` when `stop` was set first.
    pub fn load_rules(
        self,
        seed: Option<&str>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<ControlPlane>, ControlPlaneError> {
        let status = Arc::clone(&self.state.status);
        let waiting = |why: Option<String>| status.update(|s| s.waiting_for = why);
        let Some(control) = RulesControl::start_until(
            &self.config,
            self.compiler,
            seed,
            &self.state.instance,
            stop,
            &waiting,
        )?
        else {
            return Ok(None);
        };
        self.state
            .rules
            .set(Arc::clone(&control) as Arc<dyn RulesPlane>);
        Ok(Some(ControlPlane {
            control,
            status: self.state.status,
            recent: self.state.recent,
            checkpoints: self.state.checkpoints,
            server: self.server,
        }))
    }
}

impl ControlPlane {
    /// Serves the admin API on `admin.listen` and reads the control topic (seeding it with
    /// `seed` when empty). Returns once the newest bundle runs: score with
    /// [`RulesControl::table`] and report to [`Self::observers`].
    pub fn start(
        config: &riskstream_common::Config,
        seed: Option<&str>,
        labels: Option<Arc<LabelStore>>,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, ControlPlaneError> {
        AdminPlane::open(config, labels, metrics)?
            .load_rules(seed, &std::sync::atomic::AtomicBool::new(false))?
            .ok_or(ControlPlaneError::Control(
                riskstream_kafka::ControlError::Closed,
            ))
    }

    /// The status board and recent-event buffer for the pipeline to report to.
    pub fn observers(&self) -> riskstream_kafka::Observers {
        riskstream_kafka::Observers {
            status: Some(Arc::clone(&self.status)),
            recent: Some(Arc::clone(&self.recent)),
            checkpoints: Some(Arc::clone(&self.checkpoints)),
        }
    }

    /// Where the admin API listens.
    pub fn address(&self) -> SocketAddr {
        self.server.address()
    }
}

/// `admin.instance_id`, else the host name and process id.
fn instance_id(config: &riskstream_common::AdminConfig) -> String {
    if !config.instance_id.is_empty() {
        return config.instance_id.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "riskstream".into());
    format!("{host}-{}", std::process::id())
}
