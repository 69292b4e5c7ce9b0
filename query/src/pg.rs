//! The Postgres wire protocol: psql, every Postgres driver and Grafana's PostgreSQL
//! data source query the lake as they would a Postgres database named `fleetlake`.
//!
//! - Simple and extended query protocols (prepared statements, parameters), text and
//!   binary results, with Postgres type OIDs from the Arrow types (maps are sent as
//!   `json`). A prepared statement is planned again at each execution, so it reads
//!   the tables as they are then, not as they were when it was prepared.
//! - `pg_catalog` and `information_schema` answer what `psql`'s `\d` and tools'
//!   table and column pickers ask; `BEGIN`/`COMMIT`/`ROLLBACK` are accepted (there is
//!   nothing to commit); `SET`/`SHOW` of the usual session settings work.
//! - Read-only: anything that would write (DDL, DML, `COPY`, settings of the engine
//!   itself) fails with SQLSTATE 25006 or 42501 and the connection goes on.
//! - Bounded: each statement runs under the engine's memory limit and the smaller of
//!   the configured timeout and the session's `statement_timeout`, results included;
//!   a cancel request (psql's Ctrl-C) stops the running statement (57014).
//! - Users: with users configured, SCRAM-SHA-256 authentication; a user limited to
//!   some accounts sees only their rows in every table.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::common::ParamValues;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::QueryHook;
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use datafusion_postgres::arrow_pg::datatypes::{
    arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type,
};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire;
use fleetlake_model::ErrorKind;
use futures::{Sink, Stream, StreamExt, stream};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password};
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, ErrorHandler, METADATA_USER,
    PgWireConnectionState, PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::data::DataRow;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::access::{Access, Principal};
use crate::engine::{Admitted, CATALOG, QueryEngine, QueryError, plan_statement, verify_read_only};
use crate::guard::{self, Setting};
use crate::metrics as m;

/// Serves the Postgres protocol on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<QueryEngine>,
    access: Arc<Access>,
    tls: Option<Arc<crate::tls::ServerConfig>>,
) {
    let require_tls = tls.is_some();
    let tls = tls.map(pgwire::tokio::TlsAcceptor::from);
    let shared = Arc::new(Shared::new(engine, access, require_tls));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "postgres: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let handlers = Arc::new(Connection::new(Arc::clone(&shared)));
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(error) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                debug!(%peer, %error, "postgres connection ended with an error");
            }
        });
    }
}

/// What every connection shares.
struct Shared {
    access: Arc<Access>,
    passwords: Arc<Passwords>,
    manager: Arc<ConnectionManager>,
    cancels: Arc<Cancels>,
    queries: Arc<Queries>,
    /// TLS is configured: clients that did not negotiate it are refused.
    require_tls: bool,
}

impl Shared {
    fn new(engine: Arc<QueryEngine>, access: Arc<Access>, require_tls: bool) -> Self {
        let cancels = Arc::new(Cancels::default());
        Self {
            passwords: Arc::new(Passwords::new(&access)),
            manager: Arc::new(ConnectionManager::new()),
            queries: Arc::new(Queries::new(Arc::new(Core {
                engine: Arc::clone(&engine),
                access: Arc::clone(&access),
                parser: PostgresCompatibilityParser::new(),
                hooks: vec![Arc::new(SetShowHook), Arc::new(TransactionStatementHook)],
                cancels: Arc::clone(&cancels),
            }))),
            access,
            cancels,
            require_tls,
        }
    }
}

/// One connection's handlers (SCRAM keeps its exchange's state in its handler).
struct Connection {
    shared: Arc<Shared>,
    startup: Arc<Startup>,
}

impl Connection {
    fn new(shared: Arc<Shared>) -> Self {
        let auth = if shared.access.is_open() {
            Auth::Trust(Trust {
                manager: Arc::clone(&shared.manager),
            })
        } else {
            let scram = ScramAuth::new(Arc::clone(&shared.passwords) as Arc<dyn AuthSource>);
            let mut parameters = DefaultServerParameterProvider::default();
            parameters.is_superuser = false;
            Auth::Scram(
                SASLAuthStartupHandler::new(Arc::new(parameters))
                    .with_scram(scram)
                    .with_connection_manager(Arc::clone(&shared.manager)),
            )
        };
        let startup = Startup {
            auth,
            require_tls: shared.require_tls,
        };
        Self {
            shared,
            startup: Arc::new(startup),
        }
    }
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.shared.queries)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.shared.queries)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(Errors)
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(Cancel {
            manager: Arc::clone(&self.shared.manager),
            cancels: Arc::clone(&self.shared.cancels),
        })
    }
}

/// The start of a connection: TLS required when configured, then authentication.
struct Startup {
    auth: Auth,
    require_tls: bool,
}

/// Authentication: none with open access, SCRAM-SHA-256 with users configured.
enum Auth {
    Trust(Trust),
    Scram(SASLAuthStartupHandler<DefaultServerParameterProvider>),
}

struct Trust {
    manager: Arc<ConnectionManager>,
}

#[async_trait]
impl NoopStartupHandler for Trust {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(Arc::clone(&self.manager))
    }
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if self.require_tls && !client.is_secure() {
            ::metrics::counter!(m::PG_CONNECTIONS, "result" => "tls_required").increment(1);
            // FATAL: the connection is closed, never taken past authentication.
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".into(),
                "28000".into(),
                "this server accepts TLS connections only (sslmode=require or stronger)".into(),
            ))));
        }
        let result = match &self.auth {
            Auth::Trust(trust) => trust.on_startup(client, message).await,
            Auth::Scram(scram) => scram.on_startup(client, message).await,
        };
        match &result {
            Err(_) => {
                ::metrics::counter!(m::PG_CONNECTIONS, "result" => "auth_failed").increment(1)
            }
            Ok(()) if matches!(client.state(), PgWireConnectionState::ReadyForQuery) => {
                ::metrics::counter!(m::PG_CONNECTIONS, "result" => "accepted").increment(1)
            }
            Ok(()) => {}
        }
        result
    }
}

/// SCRAM verifiers of the configured users, salted once at start.
#[derive(Debug)]
struct Passwords {
    users: HashMap<String, (Vec<u8>, Vec<u8>)>,
}

impl Passwords {
    fn new(access: &Access) -> Self {
        let mut users = HashMap::new();
        for name in access.user_names() {
            if let Some(password) = access.user(name).and_then(|u| u.password.as_deref()) {
                let salt: [u8; 16] = rand_salt();
                let salted = gen_salted_password(password, &salt, 4096);
                users.insert(name.to_string(), (salt.to_vec(), salted));
            }
        }
        Self { users }
    }
}

/// Fails if the operating system cannot give random bytes, which SCRAM salts are
/// made of: the service checks at start rather than salt from anything weaker.
pub fn check_randomness() -> std::io::Result<()> {
    let mut probe = [0u8; 16];
    getrandom::fill(&mut probe)
        .map_err(|e| std::io::Error::other(format!("no random source for SCRAM salts: {e}")))
}

/// A SCRAM salt from the operating system's random source. The service refuses to
/// start without one (see [`check_randomness`]): a salt anyone can predict
/// would let a stolen verifier be attacked with precomputed tables.
fn rand_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the operating system has no random source");
    salt
}

#[async_trait]
impl AuthSource for Passwords {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        match self.users.get(user) {
            Some((salt, salted)) => Ok(Password::new(Some(salt.clone()), salted.clone())),
            None => Err(PgWireError::InvalidPassword(user.to_string())),
        }
    }
}

/// Logs what is sent to clients as errors.
struct Errors;

impl ErrorHandler for Errors {
    fn on_error<C>(&self, client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        let user = client
            .metadata()
            .get(METADATA_USER)
            .cloned()
            .unwrap_or_default();
        debug!(%user, %error, "postgres: error sent to client");
    }
}

/// Cancel requests: pgwire's (for a statement being planned) and ours (for one whose
/// rows are being sent).
struct Cancel {
    manager: Arc<ConnectionManager>,
    cancels: Arc<Cancels>,
}

#[async_trait]
impl CancelHandler for Cancel {
    async fn on_cancel_request(&self, request: CancelRequest) {
        let known = self.manager.cancel(request.pid, &request.secret_key).await;
        let key = (request.pid, request.secret_key.to_bytes());
        let flag = self
            .cancels
            .map
            .lock()
            .unwrap()
            .get(&key)
            .and_then(Weak::upgrade);
        if let Some(flag) = &flag {
            flag.cancel();
        }
        info!(
            pid = request.pid,
            known = known || flag.is_some(),
            "postgres: cancel request"
        );
    }
}

/// Connections by (pid, secret key), for cancel requests.
#[derive(Default)]
struct Cancels {
    map: Mutex<HashMap<(i32, Bytes), Weak<CancelFlag>>>,
}

/// Which statements of a connection were canceled.
#[derive(Default)]
struct CancelFlag {
    current: AtomicU64,
    canceled: AtomicU64,
    notify: tokio::sync::Notify,
}

impl CancelFlag {
    fn begin(&self) -> u64 {
        self.current.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn cancel(&self) {
        self.canceled
            .store(self.current.load(Ordering::SeqCst), Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once statement `id` is canceled.
    async fn canceled(&self, id: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.canceled.load(Ordering::SeqCst) >= id {
                return;
            }
            notified.await;
        }
    }
}

/// A connection's session, kept in its session extensions.
struct ConnState {
    ctx: SessionContext,
    principal: Principal,
    cancel: Arc<CancelFlag>,
    key: (i32, Bytes),
    cancels: Arc<Cancels>,
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.cancels.map.lock().unwrap().remove(&self.key);
    }
}

/// The prepared form of a statement: its text, and its AST and plan (for describing).
type Prepared = (String, Option<(Statement, LogicalPlan)>);

/// Runs statements for every connection.
struct Queries {
    core: Arc<Core>,
    parser: Arc<Parser>,
}

/// What running statements needs.
struct Core {
    engine: Arc<QueryEngine>,
    access: Arc<Access>,
    parser: PostgresCompatibilityParser,
    hooks: Vec<Arc<dyn QueryHook>>,
    cancels: Arc<Cancels>,
}

/// A Postgres error with `code` (SQLSTATE).
fn pg_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

fn df_error(error: DataFusionError) -> PgWireError {
    query_error(QueryError::Sql(Box::new(error)))
}

/// The Postgres error of `error`: the SQLSTATE of its kind.
fn query_error(error: QueryError) -> PgWireError {
    let message = match &error {
        // Postgres' own words, without the limit.
        QueryError::Timeout(_) => "canceling statement due to statement timeout".to_string(),
        other => other.to_string(),
    };
    pg_error(error.kind().sqlstate(), message)
}

/// `SET` and `RESET`, decided on the parsed statement ([`guard::setting`]): the
/// statement to go on with (for the settings hook, its scope removed), or the refusal.
fn settle(statement: Statement) -> PgWireResult<Statement> {
    match guard::setting(&statement) {
        None | Some(Ok(Setting::Accepted | Setting::Reset(_))) => Ok(statement),
        Some(Ok(Setting::Hook(normalized))) => Ok(*normalized),
        Some(Err((kind, message))) => {
            ::metrics::counter!(m::QUERIES, "status" => kind.label(), "protocol" => "postgres")
                .increment(1);
            Err(query_error(QueryError::Refused(kind, message)))
        }
    }
}

/// Why `statement` may not run here, if it may not.
fn refusal(statement: &Statement) -> Option<QueryError> {
    match statement {
        Statement::Query(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowFunctions { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Deallocate { .. }
        | Statement::Discard { .. } => None,
        Statement::Explain { statement, .. } => refusal(statement),
        // Decided by `settle` before this.
        Statement::Set(_) | Statement::Reset(_) => None,
        other => {
            let text = other.to_string().to_ascii_uppercase();
            let words: Vec<&str> = text.split_whitespace().collect();
            let verb = match words.as_slice() {
                [
                    first @ ("CREATE" | "DROP" | "ALTER" | "TRUNCATE"),
                    second,
                    ..,
                ] => {
                    format!("{first} {second}")
                }
                [first, ..] => first.to_string(),
                [] => String::new(),
            };
            Some(QueryError::Refused(
                ErrorKind::ReadOnly,
                format!(
                    "cannot execute {verb} in a read-only transaction: fleetlake's SQL is read-only"
                ),
            ))
        }
    }
}

/// Where the SET hook keeps `statement_timeout`.
const STATEMENT_TIMEOUT_KEY: &str = "statement_timeout_ms";

/// The session's `statement_timeout` (as the SET hook stores it), if any.
fn session_timeout<C: ClientInfo + ?Sized>(client: &C) -> Option<Duration> {
    client
        .metadata()
        .get(STATEMENT_TIMEOUT_KEY)
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// Maps are sent as `json` text.
fn is_map(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Map(..))
}

/// The schema as sent: map columns become text (JSON).
fn wire_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                if is_map(f.data_type()) {
                    Field::new(f.name(), DataType::Utf8, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect::<Vec<_>>(),
    ))
}

/// Row descriptions for `schema` in `format`.
fn pg_fields(schema: &Schema, format: &Format) -> PgWireResult<Vec<FieldInfo>> {
    let wire = wire_schema(schema);
    let mut fields = arrow_schema_to_pg_fields(&wire, format, None)?;
    for (i, field) in schema.fields().iter().enumerate() {
        if is_map(field.data_type()) {
            let info = &fields[i];
            fields[i] = FieldInfo::new(info.name().into(), None, None, Type::JSON, info.format());
        }
    }
    Ok(fields)
}

/// `batch` as sent: map columns as JSON text.
fn wire_batch(batch: RecordBatch, wire: &SchemaRef) -> PgWireResult<RecordBatch> {
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| is_map(f.data_type()))
    {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .zip(batch.schema().fields())
        .map(|(column, field)| {
            if is_map(field.data_type()) {
                crate::format::nested_as_json(field, column)
            } else {
                Ok(Arc::clone(column))
            }
        })
        .collect::<Result<Vec<ArrayRef>, _>>()
        .map_err(|e| pg_error(ErrorKind::Data.sqlstate(), e.to_string()))?;
    RecordBatch::try_new(Arc::clone(wire), columns)
        .map_err(|e| pg_error(ErrorKind::Data.sqlstate(), e.to_string()))
}

/// The rest of a result after its first batch, stopped by cancel or the deadline.
fn guarded(
    stream: SendableRecordBatchStream,
    cancel: Arc<CancelFlag>,
    id: u64,
    deadline: Instant,
    timeout: Duration,
) -> impl Stream<Item = PgWireResult<RecordBatch>> + Send {
    stream::unfold(Some(stream), move |state| {
        let cancel = Arc::clone(&cancel);
        async move {
            let mut stream = state?;
            let next = tokio::select! {
                biased;
                _ = cancel.canceled(id) => Some(Err(query_error(QueryError::Canceled))),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    Some(Err(query_error(QueryError::Timeout(timeout))))
                }
                batch = stream.next() => batch.map(|b| b.map_err(df_error)),
            };
            match next {
                None => None,
                Some(Ok(batch)) => Some((Ok(batch), Some(stream))),
                Some(Err(e)) => Some((Err(e), None)),
            }
        }
    })
}

impl Core {
    /// The connection's session, made at its first statement.
    fn conn<C: ClientInfo + ?Sized>(&self, client: &C) -> PgWireResult<Arc<ConnState>> {
        if let Some(state) = client.session_extensions().get::<ConnState>() {
            return Ok(state);
        }
        let user = client
            .metadata()
            .get(METADATA_USER)
            .cloned()
            .unwrap_or_default();
        let principal = self
            .access
            .principal(&user)
            .ok_or_else(|| pg_error("28000", format!("role {user:?} does not exist")))?;
        let ctx = self.engine.session(&principal).map_err(query_error)?;
        setup_pg_catalog(&ctx, CATALOG, EmptyContextProvider).map_err(|e| df_error(*e))?;
        let (pid, secret) = client.pid_and_secret_key();
        let key = (pid, secret.to_bytes());
        let cancel = Arc::new(CancelFlag::default());
        self.cancels
            .map
            .lock()
            .unwrap()
            .insert(key.clone(), Arc::downgrade(&cancel));
        let state = ConnState {
            ctx,
            principal,
            cancel,
            key,
            cancels: Arc::clone(&self.cancels),
        };
        Ok(client.session_extensions().get_or_insert_with(|| state))
    }

    fn timeout<C: ClientInfo + ?Sized>(&self, client: &C) -> Duration {
        let configured = self.engine.limits().timeout;
        match (configured, session_timeout(client)) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => Duration::from_secs(365 * 86_400),
        }
    }

    /// Plans `statement` (with `params` bound) and runs it until its first batch;
    /// the rest streams as the client reads it. Counted and timed.
    async fn run(
        &self,
        conn: &ConnState,
        timeout: Duration,
        statement: &Statement,
        params: Option<&ParamValues>,
        format: &Format,
    ) -> PgWireResult<QueryResponse> {
        let started = Instant::now();
        let id = conn.cancel.begin();
        let result = match self.engine.admit(&conn.principal) {
            Ok(admitted) => {
                self.start(conn, id, timeout, statement, params, format, admitted)
                    .await
            }
            Err(error) => Err(error),
        };
        let status = match &result {
            Ok(_) => "ok",
            Err(error) => error.kind().label(),
        };
        ::metrics::counter!(m::QUERIES, "status" => status, "protocol" => "postgres").increment(1);
        ::metrics::histogram!(m::QUERY_SECONDS, "protocol" => "postgres")
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            debug!(user = %conn.principal.name, %error, "postgres statement failed");
        }
        result.map_err(query_error)
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        conn: &ConnState,
        id: u64,
        timeout: Duration,
        statement: &Statement,
        params: Option<&ParamValues>,
        format: &Format,
        admitted: Admitted,
    ) -> Result<QueryResponse, QueryError> {
        let deadline = Instant::now() + timeout;
        let sql_err = |e| QueryError::Sql(Box::new(e));
        let work = async {
            let state = conn.ctx.state();
            let statement = DfStatement::Statement(Box::new(statement.clone()));
            let mut plan = plan_statement(&state, statement).await?;
            verify_read_only(&plan)?;
            if let Some(params) = params {
                plan = plan.replace_params_with_values(params).map_err(sql_err)?;
            }
            let (schema, mut stream) = self
                .engine
                .execute(&state, plan, &conn.principal, &admitted)
                .await?;
            // Blocking operators (aggregations, sorts, joins) do their work before the
            // first batch: under the deadline and the cancel request here.
            let first = stream.next().await.transpose().map_err(sql_err)?;
            Ok::<_, QueryError>((schema, first, stream))
        };
        let (schema, first, rest) = tokio::select! {
            biased;
            _ = conn.cancel.canceled(id) => return Err(QueryError::Canceled),
            _ = tokio::time::sleep_until(deadline.into()) => return Err(QueryError::Timeout(timeout)),
            started = work => started?,
        };
        let fields = Arc::new(
            pg_fields(&schema, format)
                .map_err(|e| QueryError::Refused(ErrorKind::Unsupported, e.to_string()))?,
        );
        let wire = wire_schema(&schema);
        // The batch being sent counts against the statement's memory; the statement
        // keeps its places under the caps until its last row is sent.
        let reservation = admitted.pool().results();
        let batches = stream::iter(first.map(Ok))
            .chain(guarded(
                rest,
                Arc::clone(&conn.cancel),
                id,
                deadline,
                timeout,
            ))
            .map(move |batch| {
                let _statement = &admitted;
                let batch = batch?;
                reservation
                    .try_resize(batch.get_array_memory_size())
                    .map_err(df_error)?;
                Ok(batch)
            });
        let row_fields = Arc::clone(&fields);
        let rows = batches.flat_map(move |batch| {
            let rows: Box<dyn Iterator<Item = PgWireResult<DataRow>> + Send> =
                match batch.and_then(|b| wire_batch(b, &wire)) {
                    Ok(batch) => encode_recordbatch(Arc::clone(&row_fields), batch),
                    Err(e) => Box::new(std::iter::once(Err(e))),
                };
            stream::iter(rows)
        });
        Ok(QueryResponse::new(fields, rows))
    }

    /// Parses a query string; a syntax error is counted as a failed statement.
    fn parse(&self, sql: &str) -> PgWireResult<Vec<Statement>> {
        if let Err(error) = self.engine.check_text(sql) {
            ::metrics::counter!(m::QUERIES, "status" => error.kind().label(), "protocol" => "postgres")
                .increment(1);
            return Err(query_error(error));
        }
        self.parser.parse(sql).map_err(|e| {
            let kind = ErrorKind::Syntax;
            ::metrics::counter!(m::QUERIES, "status" => kind.label(), "protocol" => "postgres")
                .increment(1);
            pg_error(kind.sqlstate(), format!("syntax error: {e}"))
        })
    }
}

impl Queries {
    fn new(core: Arc<Core>) -> Self {
        Self {
            parser: Arc::new(Parser {
                core: Arc::clone(&core),
            }),
            core,
        }
    }
}

/// Statements about the session's prepared statements and settings the hook does
/// not keep, answered here.
fn session_command<C>(client: &mut C, statement: &Statement) -> Option<Response>
where
    C: ClientInfo + ClientPortalStore,
    C::PortalStore: PortalStore,
{
    match guard::setting(statement) {
        Some(Ok(Setting::Accepted)) => return Some(Response::Execution(Tag::new("SET"))),
        Some(Ok(Setting::Reset(name))) => {
            let metadata = client.metadata_mut();
            for setting in guard::SESSION_SETTINGS {
                if name.as_deref().is_none_or(|n| n == *setting) {
                    metadata.remove(*setting);
                    if *setting == "statement_timeout" {
                        metadata.remove(STATEMENT_TIMEOUT_KEY);
                    }
                }
            }
            return Some(Response::Execution(Tag::new("RESET")));
        }
        _ => {}
    }
    match statement {
        Statement::Deallocate { name, .. } => {
            // DEALLOCATE ALL: statements are replaced when prepared again by name.
            if !name.value.eq_ignore_ascii_case("all") {
                client.portal_store().rm_statement(&name.value);
            }
            Some(Response::Execution(Tag::new("DEALLOCATE")))
        }
        Statement::Discard { .. } => Some(Response::Execution(Tag::new("DISCARD ALL"))),
        _ => None,
    }
}

/// A plan for statements that are answered without one.
fn no_plan() -> LogicalPlan {
    LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
        produce_one_row: false,
        schema: Arc::new(datafusion::common::DFSchema::empty()),
    })
}

fn to_response(result: PgWireResult<Response>) -> (Response, bool) {
    match result {
        Ok(response) => (response, false),
        Err(error) => (Response::Error(Box::new(ErrorInfo::from(error))), true),
    }
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let core = &self.core;
        let conn = core.conn(client)?;
        let statements = core.parse(query)?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::with_capacity(statements.len());
        'statements: for statement in statements {
            let statement = match settle(statement) {
                Ok(statement) => statement,
                Err(error) => {
                    responses.push(to_response(Err(error)).0);
                    break;
                }
            };
            if let Some(error) = refusal(&statement) {
                ::metrics::counter!(m::QUERIES, "status" => error.kind().label(), "protocol" => "postgres")
                    .increment(1);
                responses.push(to_response(Err(query_error(error))).0);
                break;
            }
            if let Some(response) = session_command(client, &statement) {
                responses.push(response);
                continue;
            }
            for hook in &core.hooks {
                if let Some(result) = hook
                    .handle_simple_query(&statement, &conn.ctx, client)
                    .await
                {
                    let (response, failed) = to_response(result);
                    responses.push(response);
                    if failed {
                        break 'statements;
                    }
                    continue 'statements;
                }
            }
            let timeout = core.timeout(client);
            let result = core
                .run(&conn, timeout, &statement, None, &Format::UnifiedText)
                .await
                .map(Response::Query);
            let (response, failed) = to_response(result);
            responses.push(response);
            if failed {
                break;
            }
        }
        Ok(responses)
    }
}

/// Positional parameters of `plan` in order, with the types DataFusion inferred.
fn parameter_types(plan: &LogicalPlan) -> PgWireResult<Vec<Option<DataType>>> {
    let inferred = plan.get_parameter_types().map_err(df_error)?;
    let mut ordered: Vec<Option<DataType>> = Vec::new();
    for (name, data_type) in inferred {
        let Some(index) = name
            .strip_prefix('$')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n > 0)
        else {
            continue;
        };
        if ordered.len() < index {
            ordered.resize(index, None);
        }
        ordered[index - 1] = data_type;
    }
    Ok(ordered)
}

fn wire_parameter_types(types: &[Option<DataType>]) -> PgWireResult<Vec<Type>> {
    types
        .iter()
        .map(|t| match t {
            Some(data_type) => into_pg_type(data_type),
            None => Ok(Type::UNKNOWN),
        })
        .collect()
}

/// Plans statements for the extended protocol (Parse, Describe).
struct Parser {
    core: Arc<Core>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let queries = &self.core;
        let conn = queries.conn(client)?;
        let mut statements = queries.parse(sql)?;
        if statements.is_empty() {
            return Ok(None);
        }
        if statements.len() > 1 {
            return Err(pg_error(
                ErrorKind::Syntax.sqlstate(),
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let statement = settle(statements.remove(0))?;
        if let Some(error) = refusal(&statement) {
            ::metrics::counter!(m::QUERIES, "status" => error.kind().label(), "protocol" => "postgres")
                .increment(1);
            return Err(query_error(error));
        }
        let text = statement.to_string();
        if matches!(
            statement,
            Statement::Deallocate { .. } | Statement::Discard { .. }
        ) || matches!(
            guard::setting(&statement),
            Some(Ok(Setting::Accepted | Setting::Reset(_)))
        ) {
            return Ok(Some((text, Some((statement, no_plan())))));
        }
        for hook in &queries.hooks {
            if let Some(plan) = hook
                .handle_extended_parse_query(&statement, &conn.ctx, client)
                .await
            {
                return Ok(Some((text, Some((statement, plan?)))));
            }
        }
        let plan = plan_statement(
            &conn.ctx.state(),
            DfStatement::Statement(Box::new(statement.clone())),
        )
        .await
        .map_err(query_error)?;
        Ok(Some((text, Some((statement, plan)))))
    }

    fn get_parameter_types(&self, statement: &Self::Statement) -> PgWireResult<Vec<Type>> {
        match statement {
            (_, Some((_, plan))) => wire_parameter_types(&parameter_types(plan)?),
            _ => Ok(Vec::new()),
        }
    }

    fn get_result_schema(
        &self,
        statement: &Self::Statement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match statement {
            (_, Some((_, plan))) if !matches!(plan, LogicalPlan::Ddl(_) | LogicalPlan::Dml(_)) => {
                pg_fields(
                    plan.schema().as_arrow(),
                    format.unwrap_or(&Format::UnifiedText),
                )
            }
            _ => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (_, Some((statement, plan))) = &portal.statement.statement else {
            return Ok(Response::EmptyQuery);
        };
        if let Some(response) = session_command(client, statement) {
            return Ok(response);
        }
        let core = &self.core;
        let conn = core.conn(client)?;
        let inferred = parameter_types(plan)?;
        let wire = wire_parameter_types(&inferred)?;
        let inferred_refs: Vec<Option<&DataType>> = inferred.iter().map(Option::as_ref).collect();
        let wire_refs: Vec<Option<&Type>> = wire.iter().map(Some).collect();
        let params = deserialize_parameters_with_server_types(portal, &inferred_refs, &wire_refs)?;
        for hook in &core.hooks {
            if let Some(result) = hook
                .handle_extended_query(statement, plan, &params, &conn.ctx, client)
                .await
            {
                return result;
            }
        }
        let timeout = core.timeout(client);
        // Planned again: a prepared statement reads the tables as they are now.
        core.run(
            &conn,
            timeout,
            statement,
            Some(&params),
            &portal.result_column_format,
        )
        .await
        .map(Response::Query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salts_come_from_the_operating_system_and_differ() {
        check_randomness().unwrap();
        let salts: std::collections::HashSet<[u8; 16]> = (0..64).map(|_| rand_salt()).collect();
        assert_eq!(salts.len(), 64);
    }
}
